"""Retrieval quality benchmark: the evaluate flow in every retrieval mode on one BEIR dataset.

Run: .venv/bin/python bench/bench_retrieval.py [--dataset ../shared/datasets/scifact] [--collection scifact]

Ingests the dataset's corpus with both vectors (`ragbatch ingest DATASET --retrieval hybrid`) unless
the collection already exists, then evaluates dense, sparse (BM25), hybrid RRF and hybrid DBSF on
the split, exactly as `ragbatch evaluate` does. Prints a Markdown table and writes
bench/results/retrieval.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import flows  # noqa: E402,F401  (offline defaults)

MODES = [("dense", "rrf"), ("sparse", "rrf"), ("hybrid", "rrf"), ("hybrid", "dbsf")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", type=Path, default=ROOT.parent / "shared" / "datasets" / "scifact")
    parser.add_argument("--collection", default="scifact")
    parser.add_argument("--split", default="test")
    parser.add_argument("--data-dir", type=Path, default=None, help="ragbatch data directory (default: RAGBATCH_DATA_DIR or .ragbatch)")
    args = parser.parse_args()

    from flows.evaluate import evaluate
    from flows.ingest import ingest
    from tasks.settings import EvaluateParams, FusionMethod, IngestParams, RetrievalMode
    from tasks.store import QdrantStore

    location = {"data_dir": args.data_dir} if args.data_dir else {}
    ingest_params = IngestParams(source=args.dataset, collection=args.collection, retrieval=RetrievalMode.hybrid, **location)
    store = QdrantStore.connect(ingest_params.store)
    exists = store.resolve(args.collection) is not None
    store.close()
    ingest_seconds = None
    if not exists:
        ingest_seconds = ingest(ingest_params).seconds

    results = {"dataset": args.dataset.name, "split": args.split, "collection": args.collection, "ingest_s": ingest_seconds, "runs": []}
    for mode, fusion in MODES:
        started = time.perf_counter()
        report = evaluate(EvaluateParams(dataset=args.dataset, collection=args.collection, split=args.split,
                                         retrieval=RetrievalMode(mode), fusion=FusionMethod(fusion), **location))
        summary = report.model_dump()
        summary["wall_s"] = round(time.perf_counter() - started, 1)
        results["runs"].append(summary)
    out = ROOT / "bench" / "results"
    out.mkdir(exist_ok=True)
    (out / "retrieval.json").write_text(json.dumps(results, indent=2))
    print(f"{results['dataset']} ({results['split']}), collection {args.collection}\n")
    print("| retrieval | queries | nDCG@10 | recall@10 | recall@100 | MRR@10 | seconds |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for run in results["runs"]:
        name = run["retrieval"] + (f" ({run['fusion']})" if run["fusion"] else "")
        print(f"| {name} | {run['queries']} | {run['ndcg@10']:.4f} | {run['recall@10']:.4f} | {run['recall@100']:.4f} "
              f"| {run['mrr@10']:.4f} | {run['seconds']:.1f} |")


if __name__ == "__main__":
    main()
