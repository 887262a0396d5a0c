"""Generation benchmark: the answer flow's vLLM step vs Hugging Face transformers `generate`.

Run: .venv/bin/python bench/bench_generate.py [--prompts 72] [--max-tokens 64] [--vllm-only] [--malloc fixed|glibc]

Same model (the bundled SmolLM2-135M-Instruct, in the dtype the answer flow picks: bfloat16 where
the CPU has native bf16, else float32), same RAG prompts (the sample question set
retrieved against the sample corpus, chat template applied), same max_tokens, greedy decoding, one
process, one run. Baselines: `model.generate` one prompt at a time, and in left-padded batches of
16. Prints a Markdown table and writes bench/results/generate.json (generate-<malloc>.json with
--vllm-only). `--malloc fixed` sets the mmap threshold the ingest flow sets (tasks/memory.py), to
measure what it would cost generation.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

from scratch import scratch_dir  # bench/scratch.py: the script's own directory is on sys.path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))



def retrieved_sample_questions(work: Path, top_ks: tuple[int, ...]) -> list:
    """The sample corpus ingested under `work`; the sample questions with their passages, once per top_k
    (a list of `Pending` per top_k), retrieved as the answer flow does by default."""
    from flows.ingest import ingest
    from tasks.answering import Pending, retrieve_part
    from tasks.questions import QUESTION_COLUMN, to_question
    from tasks.retrieval import open_retriever
    from tasks.settings import AnswerParams, IngestParams
    from tasks.sources import read_rows
    from tasks.store import QdrantStore

    params = IngestParams(source=ROOT / "data" / "corpus", collection="bench", data_dir=work)
    ingest(params)
    questions = [to_question(r) for r in read_rows(ROOT / "data" / "questions.jsonl", text_column=QUESTION_COLUMN)]
    store = QdrantStore.connect(params.store)
    retriever = open_retriever(store, "bench", AnswerParams.model_fields["retrieval"].default)  # the answer flow's default
    parts = []
    for top_k in top_ks:
        part = [Pending(q) for q in questions]
        retrieve_part(part, store, retriever, top_k=top_k, score_threshold=None)
        parts.append(part)
    store.close()
    return parts


def rag_prompts(work: Path, models_dir: Path, count: int) -> tuple[str, list[str]]:
    """Distinct chat-templated RAG prompts: every sample question with 4, 3, 2 and 1 passages."""
    from tasks.answering import build_prompts
    from tasks.llm import load_chat_tokenizer
    from tasks.llm_models import DEFAULT_LLM, resolve_llm_model
    from tasks.prompts import DEFAULT_TEMPLATE, PromptBuilder, TokenizerChat

    model_dir = resolve_llm_model(DEFAULT_LLM, models_dir)
    builder = PromptBuilder(chat=TokenizerChat(load_chat_tokenizer(model_dir)), template=DEFAULT_TEMPLATE,
                            max_model_len=2048, max_tokens=128)
    prompts: list[str] = []
    for part in retrieved_sample_questions(work, (4, 3, 2, 1)):
        build_prompts(part, builder)
        prompts += [item.prompt.text for item in part]
    return model_dir, prompts[:count]


def transformers_baseline(model_dir: str, prompts: list[str], max_tokens: int, batch_size: int, dtype: str) -> tuple[float, int]:
    """Seconds and generated tokens for greedy `generate` over all prompts in batches of `batch_size`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval()
    generated = 0
    started = time.perf_counter()
    with torch.inference_mode():
        for start in range(0, len(prompts), batch_size):
            batch = tokenizer(prompts[start : start + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
            output = model.generate(**batch, max_new_tokens=max_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
            new = output[:, batch["input_ids"].shape[1] :]
            for row in new:
                tokens = row.tolist()
                generated += next((i + 1 for i, t in enumerate(tokens) if t == tokenizer.eos_token_id), len(tokens))
    return time.perf_counter() - started, generated


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=72)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--compile", action="store_true", help="Let vLLM use torch.compile (slower start, faster decode).")
    parser.add_argument("--vllm-only", action="store_true", help="Skip the transformers baselines.")
    parser.add_argument("--malloc", choices=["fixed", "glibc"], default="glibc",
                        help="glibc: the allocator's dynamic default (the answer flow's); fixed: the ingest flow's mmap threshold.")
    args = parser.parse_args()
    import flows  # noqa: F401  (offline defaults)
    from tasks.memory import fix_mmap_threshold

    if args.malloc == "fixed":
        fix_mmap_threshold()
    from tasks.llm import SamplingConfig, VLLMGenerator, engine_dtype

    work = scratch_dir("ragbatch-bench-gen-")
    models_dir = Path(os.environ.get("RAGBATCH_DATA_DIR", ROOT / ".ragbatch")) / "models"
    model_dir, prompts = rag_prompts(work, models_dir, args.prompts)

    dtype = engine_dtype("auto")
    generator = VLLMGenerator(model=model_dir, max_model_len=2048, dtype=dtype, kv_cache_gib=2.0,
                              enforce_eager=not args.compile, cache_dir=work / "cache")
    generator.generate(prompts[:2], SamplingConfig(max_tokens=4))  # engine start-up is not generation time
    started = time.perf_counter()
    completions = generator.generate(prompts, SamplingConfig(max_tokens=args.max_tokens, temperature=0.0))
    vllm_s = time.perf_counter() - started
    vllm_tokens = sum(c.completion_tokens for c in completions)

    results = {
        "prompts": len(prompts),
        "mean_prompt_tokens": round(sum(c.prompt_tokens for c in completions) / len(completions), 1),
        "max_tokens": args.max_tokens,
        "dtype": dtype,
        "vllm_mode": "compiled" if args.compile else "eager",
        "malloc": args.malloc,
        "vllm_s": round(vllm_s, 2), "vllm_output_tokens": vllm_tokens, "vllm_tok_per_s": round(vllm_tokens / vllm_s, 1),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }
    if not args.vllm_only:
        results |= baselines(model_dir, prompts, args.max_tokens, dtype, results)
    out = ROOT / "bench" / "results"
    out.mkdir(exist_ok=True)
    (out / (f"generate-{args.malloc}.json" if args.vllm_only else "generate.json")).write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    print("\n| measure | value |\n| --- | ---: |")
    for key, value in results.items():
        print(f"| {key} | {value} |")


def baselines(model_dir: str, prompts: list[str], max_tokens: int, dtype: str, vllm: dict) -> dict:
    """transformers one prompt at a time and in batches of 16, and vLLM's speed-up over each."""
    single_s, single_tokens = transformers_baseline(model_dir, prompts, max_tokens, 1, dtype)
    batched_s, batched_tokens = transformers_baseline(model_dir, prompts, max_tokens, 16, dtype)
    rates = {
        "transformers_single": single_tokens / single_s,
        "transformers_batch16": batched_tokens / batched_s,
    }
    return {
        "transformers_single_s": round(single_s, 2), "transformers_single_output_tokens": single_tokens,
        "transformers_batch16_s": round(batched_s, 2), "transformers_batch16_output_tokens": batched_tokens,
        **{f"{name}_tok_per_s": round(rate, 1) for name, rate in rates.items()},
        "ratio_vllm_over_single": round(vllm["vllm_tok_per_s"] / rates["transformers_single"], 2),
        "ratio_vllm_over_batch16": round(vllm["vllm_tok_per_s"] / rates["transformers_batch16"], 2),
    }


if __name__ == "__main__":
    main()
