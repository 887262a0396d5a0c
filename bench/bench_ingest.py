"""Ingest benchmark: the whole ingest flow vs bare SentenceTransformer.encode on the same chunks.

Run: .venv/bin/python bench/bench_ingest.py [--dataset ../shared/datasets/scifact] [--limit N]

Measures, in one process and one run:
  (b) the ingest flow from files to points (load, validate, chunk, embed, upsert) into local mode;
  (a) SentenceTransformer.encode on exactly the texts the flow embedded, same model and batch size;
  (c) a no-op re-run of the flow on the unchanged source.
Prints a Markdown table and writes bench/results/ingest.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

from scratch import scratch_dir  # bench/scratch.py: the script's own directory is on sys.path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import flows  # noqa: E402,F401  (offline defaults)


def task_seconds(flow_run_id: str) -> dict[str, float]:
    """Seconds spent per task name in one flow run, from Prefect's own records."""
    from uuid import UUID

    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    totals: dict[str, float] = {}
    this_run = FlowRunFilter(id=FlowRunFilterId(any_=[UUID(flow_run_id)]))
    with get_client(sync_client=True) as client:
        offset = 0
        while runs := client.read_task_runs(flow_run_filter=this_run, limit=200, offset=offset):
            offset += len(runs)
            for run in runs:
                name = run.name.rsplit("-", 1)[0]
                totals[name] = round(totals.get(name, 0.0) + run.total_run_time.total_seconds(), 2)
    return totals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", type=Path, default=ROOT.parent / "shared" / "datasets" / "scifact")
    parser.add_argument("--limit", type=int, default=0, help="Use only the first N documents (0: all).")
    parser.add_argument("--embed-batch-size", type=int, default=64)
    args = parser.parse_args()

    from flows.ingest import ingest
    from tasks.embedding import SentenceTransformerEmbedder
    from tasks.settings import IngestParams
    from tasks.store import QdrantStore

    work = scratch_dir("ragbatch-bench-")
    source = work / "corpus.jsonl"
    with open(args.dataset / "corpus.jsonl") as src, open(source, "w") as dst:
        for number, line in enumerate(src):
            if args.limit and number >= args.limit:
                break
            dst.write(line)
    params = IngestParams(source=source, collection="bench", data_dir=work / "state", embed_batch_size=args.embed_batch_size)

    started = time.perf_counter()
    full = ingest(params)
    full_wall = time.perf_counter() - started

    store = QdrantStore.connect(params.store)
    texts = [f"{r.payload['title']}\n{r.payload['text']}" if r.payload.get("title") else r.payload["text"]
             for r in store.iter_points("bench", fields=["text", "title"])]
    store.close()
    assert len(texts) == full.embedded, (len(texts), full.embedded)

    embedder = SentenceTransformerEmbedder(model_name=params.embedding_model, batch_size=args.embed_batch_size)
    _ = embedder.model
    started = time.perf_counter()
    embedder.model.encode(texts, batch_size=args.embed_batch_size, normalize_embeddings=True, show_progress_bar=False)
    bare = time.perf_counter() - started

    started = time.perf_counter()
    noop = ingest(params)
    noop_wall = time.perf_counter() - started
    assert noop.embedded == 0

    step_seconds = task_seconds(full.run_id)
    results = {
        "dataset": str(args.dataset.name),
        "documents": full.loaded,
        "chunks": full.embedded,
        "bare_encode_s": round(bare, 2),
        "flow_s": full.seconds,
        "flow_wall_s": round(full_wall, 2),
        "bare_chunks_per_s": round(full.embedded / bare, 1),
        "flow_chunks_per_s": round(full.embedded / full.seconds, 1),
        "ratio_flow_over_bare": round(full.seconds / bare, 3),
        "noop_s": noop.seconds,
        "noop_wall_s": round(noop_wall, 2),
        "ratio_noop_over_full": round(noop.seconds / full.seconds, 4),
        "machine": f"{platform.machine()}, {__import__('os').cpu_count()} cores",
        **{f"step_{name}_s": seconds for name, seconds in step_seconds.items()},
    }
    out = ROOT / "bench" / "results"
    out.mkdir(exist_ok=True)
    (out / "ingest.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    print()
    print("| measure | value |\n| --- | ---: |")
    for key, value in results.items():
        print(f"| {key} | {value} |")


if __name__ == "__main__":
    main()
