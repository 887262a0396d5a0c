"""Ingest cost growth: 2,000 vs 20,000 short documents (one or two sentences each).

Run: .venv/bin/python bench/bench_scale.py [--dataset ../shared/datasets/scifact] [--sizes 2000 20000] [--store edge]

Each size is a fresh `ragbatch ingest --json` process on a fresh data directory, so its peak
resident memory (from wait4) is its own. Documents are sentences of the dataset's abstracts, one
or two per document. Time per document comes from the flow's own `seconds` (process start-up and
Prefect's temporary server excluded); it should stay flat, and peak memory should not grow with the
corpus (rows stream in batches). Writes bench/results/scale.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def short_documents(dataset: Path, count: int) -> list[dict]:
    """`count` documents of one or two consecutive abstract sentences."""
    docs: list[dict] = []
    with open(dataset / "corpus.jsonl") as handle:
        for line in handle:
            sentences = [s for s in re.split(r"(?<=[.!?])\s+", json.loads(line)["text"]) if len(s) > 20]
            while sentences and len(docs) < count:
                take = 1 + len(docs) % 2
                docs.append({"id": f"d{len(docs)}", "text": " ".join(sentences[:take])})
                sentences = sentences[take:]
            if len(docs) == count:
                return docs
    raise SystemExit(f"{dataset} has too few sentences for {count} documents")


def run_ingest(source: Path, data_dir: Path, store: str) -> tuple[dict, float]:
    """The report of one ingest process and its peak RSS in MiB."""
    env = {**os.environ, "RAGBATCH_DATA_DIR": str(data_dir)}
    env.pop("PREFECT_API_URL", None)
    spec = f"{store}:{data_dir / store}" if store in ("local", "edge") else store
    command = [sys.executable, "-m", "flows.cli", "ingest", str(source), "--collection", "scale", "--json", "--store", spec]
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=err)
        _, status, usage = os.wait4(process.pid, 0)
        out.seek(0)
        err.seek(0)
        lines = out.read().decode().strip().splitlines()
        errors = err.read().decode(errors="replace").strip().splitlines()
    if status != 0:
        raise SystemExit(f"ingest failed (wait status {status}): {errors[-5:]}")
    return json.loads(lines[-1]), usage.ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", type=Path, default=ROOT.parent / "shared" / "datasets" / "scifact")
    parser.add_argument("--sizes", type=int, nargs="+", default=[2000, 20000])
    parser.add_argument("--store", default="edge", help="edge (default) or local, under each run's data directory; or a --store value.")
    args = parser.parse_args()

    rows = []
    for size in args.sizes:
        work = Path(tempfile.mkdtemp(prefix=f"ragbatch-scale-{size}-"))
        source = work / "docs.jsonl"
        source.write_text("".join(json.dumps(doc) + "\n" for doc in short_documents(args.dataset, size)))
        report, peak_mib = run_ingest(source, work / "state", args.store)
        rows.append({"documents": size, "points": report["points"], "seconds": report["seconds"],
                     "ms_per_document": round(1000 * report["seconds"] / size, 2), "peak_rss_mib": round(peak_mib)})
    out = ROOT / "bench" / "results" / "scale.json"
    out.parent.mkdir(exist_ok=True)
    out = out.with_name(f"scale-{args.store}.json") if args.store in ("local", "edge") else out
    out.write_text(json.dumps({"store": args.store, "runs": rows}, indent=2) + "\n")
    print(f"store: {args.store}\n\n| documents | points | flow s | ms/document | peak RSS MiB |\n| ---: | ---: | ---: | ---: | ---: |")
    for row in rows:
        print(f"| {row['documents']} | {row['points']} | {row['seconds']} | {row['ms_per_document']} | {row['peak_rss_mib']} |")


if __name__ == "__main__":
    main()
