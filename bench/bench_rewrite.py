"""What a changed document's crash-safe write order costs: chunk 0 written first with an empty hash.

Run: .venv/bin/python bench/bench_rewrite.py [--documents 20000] [--chunks 3] [--rounds 4]

A re-run that finds documents changed rewrites them through `indexing.write_documents`, which first
gives each document indexed before its new chunk 0 with an empty hash (so a write cut short leaves
no marker that either version matches), then writes its other chunks, deletes leftovers and writes
chunk 0 with the new hash last: one point more per changed document. The same documents are
rewritten through the same function without their previous chunk counts (no document is "indexed
before", so no chunk 0 goes first), which is the write of before. Both alternate on one edge store,
in slices of `--documents / (2 * --rounds)`, with already-built points (384-dimension random
vectors, an ingest's payload), so the clock holds the store's writes alone. Writes
bench/results/rewrite.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from scratch import scratch_dir  # bench/scratch.py: the script's own directory is on sys.path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tasks.chunking import Chunk  # noqa: E402
from tasks.indexing import UPSERT_BATCH, build_points, write_documents  # noqa: E402
from tasks.store import QdrantStore  # noqa: E402

DIMENSION = 384


def chunks(doc_ids: list[str], per_document: int, version: str) -> list[Chunk]:
    return [Chunk(doc_id, index, f"{version} {doc_id} sentence {index} about the anemometer bearings.", 0, 60, "A title",
                  f"{doc_id}.md", {"lang": "en", "team": "field"}, version)
            for doc_id in doc_ids for index in range(per_document)]


def points(doc_ids: list[str], per_document: int, version: str, rng: np.random.Generator) -> list:
    batch = chunks(doc_ids, per_document, version)
    vectors = rng.standard_normal((len(batch), DIMENSION), dtype=np.float32)
    return build_points(batch, vectors / np.linalg.norm(vectors, axis=1, keepdims=True), embedding_model="m")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--documents", type=int, default=20_000)
    parser.add_argument("--chunks", type=int, default=3, help="chunks per document")
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    store = QdrantStore.connect(f"edge:{scratch_dir('rb-bench-rewrite-') / 'edge'}")
    store.create_collection("c", dimension=DIMENSION, metadata={})
    doc_ids = [f"d{n}" for n in range(args.documents)]
    for start in range(0, len(doc_ids), UPSERT_BATCH):
        write_documents(store, "c", points(doc_ids[start:start + UPSERT_BATCH], args.chunks, "v1", rng), {})
    seconds = {"chunk 0 first (now)": 0.0, "without (before)": 0.0}
    slices = np.array_split(np.array(doc_ids), 2 * args.rounds)
    for round_number in range(args.rounds):
        order = list(seconds) if round_number % 2 == 0 else list(reversed(seconds))
        for way, part in zip(order, slices[2 * round_number:2 * round_number + 2], strict=True):
            ids = part.tolist()
            previous = {doc_id: args.chunks for doc_id in ids} if way.startswith("chunk 0") else {}
            for start in range(0, len(ids), UPSERT_BATCH):
                written = points(ids[start:start + UPSERT_BATCH], args.chunks, "v2", rng)
                clock = time.perf_counter()
                write_documents(store, "c", written, {doc_id: previous[doc_id] for doc_id in ids[start:start + UPSERT_BATCH]
                                                       if doc_id in previous})
                seconds[way] += time.perf_counter() - clock
    store.close()
    per_way = args.documents // 2
    result = {way: {"seconds": round(value, 2), "documents_per_s": round(per_way / value)} for way, value in seconds.items()}
    result["settings"] = vars(args)
    (ROOT / "bench" / "results").mkdir(exist_ok=True)
    (ROOT / "bench" / "results" / "rewrite.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
