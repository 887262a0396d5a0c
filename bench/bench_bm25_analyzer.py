"""BM25 analyzer versions side by side: SciFact nDCG@10 of a BM25-only collection built with each.

Run: .venv/bin/python bench/bench_bm25_analyzer.py [--dataset ../shared/datasets/scifact]

Version 1 (lowercased words) is what collections built before the analyzer recorded its version
keep; version 2 (the current one) reads the text in Unicode NFKC, case-folded (tasks/sparse.py). Each version ingests the corpus into its own BM25-only
collection (`--retrieval sparse`: no embedding) of one scratch edge store, then the evaluate flow
scores the split in sparse mode; a collection's queries are analysed by the version it records.
Version 1 is built by setting the version new collections record, as older ragbatch did. The
quality numbers do not depend on the machine. Its speed does: each version also analyses the
corpus's texts (title + text), alternating, `--rounds` times; the best round counts. Writes
bench/results/bm25_analyzer.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from scratch import scratch_dir  # bench/scratch.py: the script's own directory is on sys.path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import flows  # noqa: E402,F401  (offline defaults)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", type=Path, default=ROOT.parent / "shared" / "datasets" / "scifact")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    results = {"dataset": args.dataset.name, "analysis_us_per_text": analysis_speed(args.dataset, args.rounds), "runs": []}

    from flows.evaluate import evaluate
    from flows.ingest import ingest
    from tasks import ingest as ingest_tasks
    from tasks.settings import EvaluateParams, IngestParams, RetrievalMode

    data_dir = scratch_dir("rb-bench-bm25-")
    current = ingest_tasks.ANALYZER_VERSION
    for version in (1, current):
        ingest_tasks.ANALYZER_VERSION = version  # what a new collection records, and so is built and queried with
        collection = f"bm25-v{version}"
        ingest(IngestParams(source=args.dataset, collection=collection, retrieval=RetrievalMode.sparse, data_dir=data_dir))
        report = evaluate(EvaluateParams(dataset=args.dataset, collection=collection, retrieval=RetrievalMode.sparse,
                                         data_dir=data_dir)).model_dump()
        results["runs"].append({"analyzer": version, **{name: report[name] for name in ("ndcg@10", "recall@10", "recall@100", "mrr@10")}})
    ingest_tasks.ANALYZER_VERSION = current
    (ROOT / "bench" / "results").mkdir(exist_ok=True)
    (ROOT / "bench" / "results" / "bm25_analyzer.json").write_text(json.dumps(results, indent=2) + "\n")
    print("| analyzer | nDCG@10 | recall@10 | recall@100 | MRR@10 | µs per text |\n| --- | ---: | ---: | ---: | ---: | ---: |")
    for run in results["runs"]:
        print(f"| {run['analyzer']} | {run['ndcg@10']:.4f} | {run['recall@10']:.4f} | {run['recall@100']:.4f} | {run['mrr@10']:.4f} "
              f"| {results['analysis_us_per_text'][str(run['analyzer'])]:.1f} |")


def analysis_speed(dataset: Path, rounds: int) -> dict[str, float]:
    """Microseconds per corpus text (title + text) that each analyzer version takes, best of `rounds`."""
    from tasks.sparse import ANALYZER_VERSION, Analyzer

    with open(dataset / "corpus.jsonl", encoding="utf-8") as corpus:
        texts = [f"{record.get('title', '')}\n{record['text']}" for record in map(json.loads, corpus)]
    analyzers = {str(version): Analyzer(version) for version in (1, ANALYZER_VERSION)}
    best = dict.fromkeys(analyzers, float("inf"))
    for _ in range(rounds):
        for name, analyzer in analyzers.items():
            started = time.perf_counter()
            for text in texts:
                analyzer.terms(text)
            best[name] = min(best[name], (time.perf_counter() - started) / len(texts) * 1e6)
    return best


if __name__ == "__main__":
    main()
