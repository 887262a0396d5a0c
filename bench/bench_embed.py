"""Embedding benchmark: sentence-transformers `encode` vs vLLM's pooling runner on the same passages.

Run: .venv/bin/python bench/bench_embed.py [--dataset ../shared/datasets/scifact] [--limit 5000] [--rounds 6]
                                           [--texts passages|chunks|sentences] [--vllm-dtype auto|float32|bfloat16]

Each backend lives in its own process (a vLLM engine changes its host process's threading, which
would slow sentence-transformers beside it) and loads once; then both embed the same `title + text`
passages of the dataset in interleaved rounds (a slice each, alternating which goes first, one at a
time), so machine noise hits both alike. Reports texts/s of each, the speed-up, and the lowest
cosine between their vectors. Writes bench/results/embed.json (embed-<texts>.json for other texts).

`--texts` picks what is embedded: `passages` (the issue's measure: title + text, mostly filling the
256-token window), `chunks` (those passages cut by ragbatch's chunker at its default size, what an
ingest embeds) or `sentences` (documents of one or two sentences, as in bench_scale.py).
`--vllm-dtype` is the vLLM backend's dtype (default auto, as ragbatch runs it: bfloat16 on CPUs with
native bfloat16, else float32); sentence-transformers always runs in float32 on CPU.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

from scratch import scratch_dir  # bench/scratch.py: the script's own directory is on sys.path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import flows  # noqa: E402,F401  (offline defaults)


def passages(dataset: Path, limit: int) -> list[str]:
    texts = []
    with open(dataset / "corpus.jsonl") as handle:
        for line in handle:
            record = json.loads(line)
            texts.append(f"{record.get('title') or ''}\n{record['text']}".strip())
            if len(texts) == limit:
                break
    return texts


def chunks(dataset: Path, limit: int) -> list[str]:
    """The first `limit` chunks of the passages, cut as an ingest with default settings cuts them."""
    from tasks.chunking import TokenChunker, load_tokenizer
    from tasks.models import resolve_embedding_model
    from tasks.settings import IngestParams

    defaults = IngestParams(source=dataset / "corpus.jsonl")
    chunker = TokenChunker(tokenizer=load_tokenizer(resolve_embedding_model(defaults.embedding_model)),
                           chunk_tokens=defaults.chunk_tokens, overlap_tokens=defaults.chunk_overlap)
    texts = [text for pieces in chunker.split(passages(dataset, limit)) for _, _, text in pieces]
    return texts[:limit]


def sentences(dataset: Path, limit: int) -> list[str]:
    from bench_scale import short_documents

    return [doc["text"] for doc in short_documents(dataset, limit)]


TEXTS = {"passages": passages, "chunks": chunks, "sentences": sentences}


def serve(backend_name: str, batch_size: int, vllm_dtype: str, texts: list[str], connection) -> None:
    """Worker process: load one backend, then embed the slices asked for and send back (seconds, vectors)."""
    from tasks.embedding import SentenceTransformerEmbedder, VLLMEmbedder

    if backend_name == "vllm":
        backend = VLLMEmbedder(model_name="all-MiniLM-L6-v2", cache_dir=scratch_dir("ragbatch-embed-"),
                               dtype=vllm_dtype)
    else:
        backend = SentenceTransformerEmbedder(model_name="all-MiniLM-L6-v2", batch_size=batch_size)
    backend.embed(texts[:32])  # load and warm up outside the clock
    connection.send("ready")
    while (job := connection.recv()) is not None:
        start, stop = job
        clock = time.perf_counter()
        vectors = backend.embed(texts[start:stop])
        connection.send((time.perf_counter() - clock, vectors))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", type=Path, default=ROOT.parent / "shared" / "datasets" / "scifact")
    parser.add_argument("--limit", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=64, help="sentence-transformers batch size.")
    parser.add_argument("--texts", choices=sorted(TEXTS), default="passages", help="What to embed (see above).")
    parser.add_argument("--vllm-dtype", choices=["auto", "float32", "bfloat16"], default="auto")
    args = parser.parse_args()
    import multiprocessing

    from tasks.llm import engine_dtype

    texts = TEXTS[args.texts](args.dataset, args.limit)
    context = multiprocessing.get_context("spawn")
    workers = {}
    for name in ("sentence-transformers", "vllm"):
        ours, theirs = context.Pipe()
        process = context.Process(target=serve, args=(name, args.batch_size, args.vllm_dtype, texts, theirs), daemon=True)
        process.start()
        assert ours.recv() == "ready"  # one at a time: loading is not measured, and must not overlap the clock
        workers[name] = (process, ours)

    seconds = {name: 0.0 for name in workers}
    vectors: dict[str, list[np.ndarray]] = {name: [] for name in workers}
    size = -(-len(texts) // args.rounds)
    for number, start in enumerate(range(0, len(texts), size)):
        names = list(workers) if number % 2 == 0 else list(workers)[::-1]
        for name in names:
            workers[name][1].send((start, start + size))
            spent, part = workers[name][1].recv()
            seconds[name] += spent
            vectors[name].append(part)
    for process, connection in workers.values():
        connection.send(None)
        process.join()

    cosine = (np.concatenate(vectors["sentence-transformers"]) * np.concatenate(vectors["vllm"])).sum(axis=1)
    result = {
        "texts": args.texts,
        "count": len(texts),
        "mean_chars": round(sum(map(len, texts)) / len(texts)),
        "st_passages_per_s": round(len(texts) / seconds["sentence-transformers"], 1),
        "vllm_passages_per_s": round(len(texts) / seconds["vllm"], 1),
        "speedup": round(seconds["sentence-transformers"] / seconds["vllm"], 2),
        "vllm_dtype": engine_dtype(args.vllm_dtype),
        "min_cosine": round(float(cosine.min()), 6),
        "seconds": {name: round(value, 2) for name, value in seconds.items()},
        "machine": f"{platform.machine()}, {len(__import__('os').sched_getaffinity(0))} cores",
    }
    name = "embed" + ("" if args.texts == "passages" else f"-{args.texts}") + ("" if args.vllm_dtype == "auto" else f"-{args.vllm_dtype}")
    out = ROOT / "bench" / "results" / f"{name}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{len(texts)} {args.texts}, {result['mean_chars']} characters on average\n")
    print(f"| backend | {args.texts}/s |\n| --- | ---: |")
    print(f"| sentence-transformers (batch {args.batch_size}) | {result['st_passages_per_s']} |")
    print(f"| vLLM pooling ({result['vllm_dtype']}) | {result['vllm_passages_per_s']} |")
    print(f"\nspeed-up {result['speedup']}x, lowest cosine {result['min_cosine']} over {len(texts)} {args.texts}")


if __name__ == "__main__":
    main()
