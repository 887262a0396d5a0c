"""Embedding benchmark: sentence-transformers `encode` vs vLLM's pooling runner on the same passages.

Run: .venv/bin/python bench/bench_embed.py [--dataset ../shared/datasets/scifact] [--limit 5000] [--rounds 5]

Both backends load once, then embed the same `title + text` passages of the dataset in
interleaved rounds (a slice each, alternating which goes first), so machine noise hits both alike.
Reports passages/s of each, the speed-up, and the lowest cosine between their vectors.
Writes bench/results/embed.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", type=Path, default=ROOT.parent / "shared" / "datasets" / "scifact")
    parser.add_argument("--limit", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=64, help="sentence-transformers batch size.")
    args = parser.parse_args()

    from tasks.embedding import SentenceTransformerEmbedder, VLLMEmbedder

    texts = passages(args.dataset, args.limit)
    st = SentenceTransformerEmbedder(model_name="all-MiniLM-L6-v2", batch_size=args.batch_size)
    vllm = VLLMEmbedder(model_name="all-MiniLM-L6-v2", cache_dir=Path(tempfile.mkdtemp(prefix="ragbatch-embed-")))
    for backend in (st, vllm):  # load and warm up outside the clock
        backend.embed(texts[:32])

    seconds = {"sentence-transformers": 0.0, "vllm": 0.0}
    vectors: dict[str, list[np.ndarray]] = {name: [] for name in seconds}
    size = -(-len(texts) // args.rounds)
    for number, start in enumerate(range(0, len(texts), size)):
        part = texts[start:start + size]
        order = [("sentence-transformers", st), ("vllm", vllm)]
        for name, backend in order if number % 2 == 0 else order[::-1]:
            clock = time.perf_counter()
            vectors[name].append(backend.embed(part))
            seconds[name] += time.perf_counter() - clock

    cosine = (np.concatenate(vectors["sentence-transformers"]) * np.concatenate(vectors["vllm"])).sum(axis=1)
    result = {
        "passages": len(texts),
        "st_passages_per_s": round(len(texts) / seconds["sentence-transformers"], 1),
        "vllm_passages_per_s": round(len(texts) / seconds["vllm"], 1),
        "speedup": round(seconds["sentence-transformers"] / seconds["vllm"], 2),
        "min_cosine": round(float(cosine.min()), 6),
        "seconds": {name: round(value, 2) for name, value in seconds.items()},
        "machine": f"{platform.machine()}, {len(__import__('os').sched_getaffinity(0))} cores",
    }
    out = ROOT / "bench" / "results" / "embed.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print("| backend | passages/s |\n| --- | ---: |")
    print(f"| sentence-transformers (batch {args.batch_size}) | {result['st_passages_per_s']} |")
    print(f"| vLLM pooling | {result['vllm_passages_per_s']} |")
    print(f"\nspeed-up {result['speedup']}x, lowest cosine {result['min_cosine']} over {len(texts)} passages")


if __name__ == "__main__":
    main()
