"""The ingest's work around the model, per chunk: chunking, BM25 vectors, building points, writing them.

Run: .venv/bin/python bench/bench_prep.py [--dataset ../shared/datasets/scifact] [--limit 5183]

On CPU the embedding model takes 20-50 ms per chunk and this work is a few per cent of an ingest; with
a GPU embedding thousands of chunks per second, it sets the pace. Side by side in one process, on
the dataset's documents in the ingest's batches (`batch_docs`), default chunking, hybrid layout:

- chunking one document at a time (`chunk_indices` per text, as ragbatch did until 2026-11-29) vs
  `TokenChunker.chunk`, which hands the splitter a batch's texts at once so it runs on every core;
- `build_points` (dense and BM25 sparse vectors, payloads, PointStructs; random unit vectors stand in
  for the model's) with each term's id hash computed for every occurrence vs memoized
  (`tasks.sparse.term_id`, cold when the run starts);
- `write_documents` of those points into a fresh edge store, without and with the probe for chunks a
  crashed write left beyond a document's marker (`tasks.indexing.stored_chunk_ends`, 2026-12-01), each
  variant into its own store.

Every step runs per batch of `batch_docs` documents, as the ingest flow calls it.

Both variants of a step run on each batch in turn (alternating which goes first) and must give
identical output. Writes bench/results/prep.json.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from scratch import scratch_dir  # bench/scratch.py: the script's own directory is on sys.path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import flows  # noqa: E402,F401  (offline defaults)


def documents(dataset: Path, limit: int) -> list[Any]:
    """The first `limit` rows of a BEIR corpus, read as the ingest reads them."""
    from tasks.sources import read_rows

    return list(itertools.islice(read_rows(dataset), limit))


def timed(function: Callable[[], Any]) -> tuple[Any, float, float]:
    """(result, wall seconds, CPU seconds of this process). A full garbage collection first, untimed:
    with Prefect, torch and transformers loaded one takes 0.1-0.3 s, and landing inside one variant's
    time it would decide a comparison on its own."""
    gc.collect()
    cpu, wall = os.times(), time.perf_counter()
    result = function()
    after = os.times()
    return result, time.perf_counter() - wall, (after.user - cpu.user) + (after.system - cpu.system)


class SideBySide:
    """Wall and CPU seconds per step and variant, summed over batches; on each batch every variant of a
    step runs in turn (alternating which goes first) and all must give the same output."""

    def __init__(self) -> None:
        self.totals: dict[str, dict[str, dict[str, float]]] = {}

    def run(self, step: str, variants: dict[str, Callable[[], Any]], number: int) -> Any:
        """The output of `variants` (all equal) on this batch; `number` alternates the order."""
        outputs = {}
        for name in list(variants) if number % 2 == 0 else list(reversed(variants)):
            outputs[name], wall, cpu = timed(variants[name])
            total = self.totals.setdefault(step, {}).setdefault(name, {"wall_s": 0.0, "cpu_s": 0.0})
            total["wall_s"] += wall
            total["cpu_s"] += cpu
        first, *others = outputs.values()
        assert all(other == first for other in others), f"{step}: variants disagree on batch {number}"
        return first


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", type=Path, default=ROOT.parent / "shared" / "datasets" / "scifact")
    parser.add_argument("--limit", type=int, default=5183)
    args = parser.parse_args()

    from tasks import sparse
    from tasks.chunking import Chunk, TokenChunker, load_tokenizer
    from tasks import indexing
    from tasks.indexing import build_points
    from tasks.models import embedding_text_limit, resolve_embedding_model
    from tasks.settings import IngestParams
    from tasks.store import QdrantStore, VectorLayout

    defaults = IngestParams(source=args.dataset / "corpus.jsonl")
    chunker = TokenChunker(tokenizer=load_tokenizer(resolve_embedding_model(defaults.embedding_model)),
                           chunk_tokens=defaults.chunk_tokens, overlap_tokens=defaults.chunk_overlap,
                           model_tokens=embedding_text_limit(defaults.embedding_model))
    rows = documents(args.dataset, args.limit)
    layout = VectorLayout(dense=True, sparse=True)
    work = scratch_dir("ragbatch-prep-")
    stores = {name: QdrantStore.connect(f"edge:{work / name}") for name in ("unprobed", "probed")}
    for store in stores.values():
        store.create_collection("prep", dimension=384, metadata={}, layout=layout)
    probe = indexing.stored_chunk_ends

    def write_with(name: str, points: list) -> Callable[[], int]:
        def write() -> int:
            indexing.stored_chunk_ends = probe if name == "probed" else (lambda store, collection, starts: dict(starts))
            try:
                return indexing.write_documents(stores[name], "prep", points, {})
            finally:
                indexing.stored_chunk_ends = probe
        return write
    rng = np.random.default_rng(0)
    memoized = sparse.term_id
    memoized.cache_clear()
    timing = SideBySide()
    bm25 = None
    chunk_count = 0

    def one_at_a_time(batch: list) -> list[Chunk]:
        return [Chunk(row.doc_id, index, text, start, start + len(text), row.title, row.source, row.metadata, digest)
                for row, digest in batch for index, (start, text) in enumerate(chunker._text.chunk_indices(row.text))]

    def points_with(term_id: Callable[[str], int], chunks: list, vectors: np.ndarray) -> Callable[[], list]:
        def build() -> list:
            sparse.term_id = term_id  # `_counts` looks the function up at call time
            try:
                return build_points(chunks, vectors, embedding_model=defaults.embedding_model, layout=layout, bm25=bm25)
            finally:
                sparse.term_id = memoized
        return build

    for number, start in enumerate(range(0, len(rows), defaults.batch_docs)):
        batch = [(row, "cd" * 32) for row in rows[start:start + defaults.batch_docs]]
        chunks = timing.run("chunking", {"one document at a time": lambda: one_at_a_time(batch),  # noqa: B023
                                         "a batch at once (TokenChunker.chunk)": lambda: chunker.chunk(batch)}, number)  # noqa: B023
        bm25 = bm25 or sparse.Bm25(avgdl=sparse.mean_length([chunk.sparse_text for chunk in chunks]))
        vectors = rng.normal(size=(len(chunks), 384)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        points = timing.run("build_points", {"hash per term occurrence": points_with(memoized.__wrapped__, chunks, vectors),
                                             "memoized term ids": points_with(memoized, chunks, vectors)}, number)
        timing.run("write_documents (edge)", {"without the probe": write_with("unprobed", points),
                                              "with the probe": write_with("probed", points)}, number)
        chunk_count += len(chunks)
    for store in stores.values():
        store.close()

    steps = {step: {name: {key: round(value, 3) for key, value in total.items()}
                    | {"us_per_chunk": round(1e6 * total["wall_s"] / chunk_count, 1)} for name, total in variants.items()}
             for step, variants in timing.totals.items()}
    before = sum(next(iter(variants.values()))["wall_s"] for variants in steps.values())
    after = sum(list(variants.values())[-1]["wall_s"] for variants in steps.values())
    result = {"documents": len(rows), "chunks": chunk_count, "cpus": os.cpu_count(), "steps": steps,
              "ceiling_chunks_per_s": {"before": round(chunk_count / before), "after": round(chunk_count / after)}}
    out = ROOT / "bench" / "results" / "prep.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
