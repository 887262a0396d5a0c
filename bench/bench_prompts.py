"""Prompt building for a served model: the local tokenizer vs the vLLM server's `/tokenize`, one prompt
at a time and `--concurrency` at a time (the answer flow's `llm_concurrency`).

Run: .venv/bin/python bench/bench_prompts.py [--repeat 5] [--concurrency 8] [--rounds 5]

`ragbatch serve` runs the bundled SmolLM2-135M-Instruct on loopback (max_model_len 1024). The sample
question set is retrieved against the sample corpus at top_k 8 and 4, `--repeat` times over, and each
way builds the same prompts with the answer flow's `build_prompts` (passages dropped to leave 128
tokens for the answer). The ways take turns for `--rounds` rounds; the median round is reported,
and every way must give exactly the prompts of the local tokenizer. Prints a Markdown table and
writes bench/results/prompts.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

from bench_generate import retrieved_sample_questions
from scratch import scratch_dir  # bench/scratch.py: the script's own directory is on sys.path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MAX_MODEL_LEN = 1024
MAX_TOKENS = 128


def timed_build(parts: list, chat) -> tuple[float, list]:
    """Seconds to build the prompts of fresh copies of `parts` with `chat`, and each question's prompt or error."""
    from tasks.answering import Pending, build_prompts
    from tasks.prompts import DEFAULT_TEMPLATE, PromptBuilder

    builder = PromptBuilder(chat=chat, template=DEFAULT_TEMPLATE, max_model_len=MAX_MODEL_LEN, max_tokens=MAX_TOKENS)
    fresh = [[Pending(item.question, hits=item.hits) for item in part] for part in parts]
    started = time.perf_counter()
    for part in fresh:
        build_prompts(part, builder)
    seconds = time.perf_counter() - started
    return seconds, [item.prompt or item.error for part in fresh for item in part]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=5, help="Times the question set is built over.")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    import flows  # noqa: F401  (offline defaults)
    from tasks.child_process import free_port
    from tasks.llm import ServerChat, load_chat_tokenizer
    from tasks.llm_models import DEFAULT_LLM, resolve_llm_model
    from tasks.prompts import TokenizerChat
    from tests.conftest import running_server

    work = scratch_dir("ragbatch-bench-prompts-")
    data_dir = Path(os.environ.get("RAGBATCH_DATA_DIR", ROOT / ".ragbatch"))
    parts = retrieved_sample_questions(work, (8, 4)) * args.repeat
    prompts = sum(len(part) for part in parts)
    port = free_port()
    command = [sys.executable, "-m", "flows.cli", "serve", "--port", str(port), "--max-model-len", str(MAX_MODEL_LEN),
               "--kv-cache-gib", "1"]
    with running_server(command, {**os.environ, "RAGBATCH_DATA_DIR": str(data_dir)}, host="127.0.0.1", port=port,
                        cwd=ROOT) as url:
        ways = {
            "local tokenizer": TokenizerChat(load_chat_tokenizer(resolve_llm_model(DEFAULT_LLM, data_dir / "models"))),
            "server, 1 at a time": ServerChat(base_url=url, model=DEFAULT_LLM, concurrency=1),
            f"server, {args.concurrency} at a time": ServerChat(base_url=url, model=DEFAULT_LLM, concurrency=args.concurrency),
        }
        timed_build(parts[:1], ways["server, 1 at a time"])  # the server's first requests are not the measure
        seconds: dict[str, list[float]] = {way: [] for way in ways}
        expected = None
        for _ in range(args.rounds):
            for way, chat in ways.items():
                took, built = timed_build(parts, chat)
                expected = expected or built
                if built != expected:
                    raise SystemExit(f"{way} built other prompts (or token counts) than the local tokenizer")
                seconds[way].append(took)
    fitted = [prompt for prompt in expected if not isinstance(prompt, str)]
    results = {"prompts": prompts, "prompts_with_passages_dropped_to_fit": sum(1 for p in fitted if p.dropped),
               "fitting_tries_per_prompt": round(sum(p.dropped + 1 for p in fitted) / len(fitted), 2), "rounds": args.rounds,
               "max_model_len": MAX_MODEL_LEN, "max_tokens": MAX_TOKENS, "cpus": os.cpu_count(), "ways": {}}
    for way, runs in seconds.items():
        median = statistics.median(runs)
        results["ways"][way] = {"median_s": round(median, 3), "ms_per_prompt": round(1000 * median / prompts, 2),
                                "prompts_per_s": round(prompts / median, 1), "rounds_s": [round(r, 3) for r in runs]}
    out = ROOT / "bench" / "results"
    out.mkdir(exist_ok=True)
    (out / "prompts.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    print(f"\n{prompts} prompts, median of {args.rounds} rounds\n\n| way | ms per prompt | prompts/s |\n| --- | ---: | ---: |")
    for way, measure in results["ways"].items():
        print(f"| {way} | {measure['ms_per_prompt']} | {measure['prompts_per_s']} |")


if __name__ == "__main__":
    main()
