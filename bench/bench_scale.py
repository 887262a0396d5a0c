"""Ingest cost growth: 2,000 vs 20,000 short documents (one or two sentences each).

Run: .venv/bin/python bench/bench_scale.py [--dataset ../shared/datasets/scifact] [--sizes 2000 20000] [--store edge]

Each size is a fresh `ragbatch ingest --json` process on a fresh data directory, so its peak
resident memory (from wait4) is its own. Documents are sentences of the dataset's abstracts, one
or two per document. Time per document comes from the flow's own `seconds` (process start-up and
Prefect's temporary server excluded); it should stay flat, and peak memory should not grow with the
corpus (rows stream in batches). Writes bench/results/scale.json.

An embedded store lives inside the ingest process, so its own memory (segments, payload indexes,
the HNSW build of `optimize`) is part of that peak. To separate it, each size also runs a
store-only process: the same number of points, shaped like an ingest's (dense and sparse vectors,
the same payload keys and sizes), written in the same batches to a fresh store of the same kind,
then optimized, with no model, Prefect or pipeline. Its peak is the store's share; the ingest's
peak minus it is the pipeline's.

Resident memory has two parts, sampled every 50 ms from /proc/PID/status: anonymous memory (RssAnon:
heaps, tensors, the engine's in-memory structures), which is what the process itself holds, and
file-backed pages (RssFile: the engine's memory-mapped segment files and the loaded libraries),
which the kernel can drop and read back. Both peaks are reported beside wait4's peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from scratch import scratch_dir  # bench/scratch.py: the script's own directory is on sys.path

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


def spec_for(store: str, data_dir: Path) -> str:
    """`--store` for `edge`/`local` under `data_dir`, or the given spec."""
    return f"{store}:{data_dir / store}" if store in ("local", "edge") else store


def wait_with_memory(process: subprocess.Popen) -> tuple[int, dict[str, float]]:
    """Wait for `process`: its wait status, and its peaks in MiB of resident memory (wait4) and of the
    anonymous and file-backed parts of it (sampled every 50 ms)."""
    peaks = {"RssAnon": 0.0, "RssFile": 0.0}
    while True:
        pid, status, usage = os.wait4(process.pid, os.WNOHANG)
        if pid:
            process.returncode = os.waitstatus_to_exitcode(status)
            return status, {"rss": usage.ru_maxrss / 1024, "anon": peaks["RssAnon"], "file": peaks["RssFile"]}
        try:
            with open(f"/proc/{process.pid}/status") as status_file:
                for line in status_file:
                    key, _, value = line.partition(":")
                    if key in peaks:
                        peaks[key] = max(peaks[key], int(value.split()[0]) / 1024)
        except (FileNotFoundError, ProcessLookupError):
            pass
        time.sleep(0.05)


def run_ingest(source: Path, data_dir: Path, store: str) -> tuple[dict, dict[str, float]]:
    """The report of one ingest process and its peak memory in MiB."""
    env = {**os.environ, "RAGBATCH_DATA_DIR": str(data_dir)}
    env.pop("PREFECT_API_URL", None)
    spec = spec_for(store, data_dir)
    command = [sys.executable, "-m", "flows.cli", "ingest", str(source), "--collection", "scale", "--json", "--store", spec]
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=err)
        status, memory = wait_with_memory(process)
        out.seek(0)
        err.seek(0)
        lines = out.read().decode().strip().splitlines()
        errors = err.read().decode(errors="replace").strip().splitlines()
    if status != 0:
        raise SystemExit(f"ingest failed (wait status {status}): {errors[-5:]}")
    return json.loads(lines[-1]), memory


def write_store_only(spec: str, points: int, text_chars: int) -> None:
    """Child process: `points` ingest-shaped points into a fresh store, in ingest-sized batches, then optimize."""
    import numpy as np
    from qdrant_client import models

    sys.path.insert(0, str(ROOT))
    from tasks.chunking import Chunk
    from tasks.indexing import chunk_payload, point_id
    from tasks.store import QdrantStore, VectorLayout

    rng = np.random.default_rng(0)
    store = QdrantStore.connect(spec)
    store.create_collection("scale", dimension=384, metadata={}, layout=VectorLayout(dense=True, sparse=True))
    for start in range(0, points, 64):
        batch = []
        for i in range(start, min(points, start + 64)):
            vector = rng.normal(size=384).astype(np.float32)
            terms = sorted(rng.choice(30_000, 20, replace=False).tolist())
            batch.append(models.PointStruct(
                id=point_id(f"d{i}", 0),
                vector={"dense": (vector / np.linalg.norm(vector)).tolist(),
                        "sparse": models.SparseVector(indices=terms, values=[1.0] * len(terms))},
                payload=chunk_payload(Chunk(f"d{i}", 0, "x" * text_chars, 0, text_chars, "", "docs.jsonl", {}, "cd" * 32),
                                      n_chunks=1, embedding_model="all-MiniLM-L6-v2")))
        store.upsert("scale", batch)
    store.optimize("scale")
    store.close()


def store_only_peak(spec: str, points: int, text_chars: int) -> dict[str, float]:
    """Peak memory in MiB of a `write_store_only` process."""
    command = [sys.executable, str(Path(__file__)), "--store-only", spec, str(points), str(text_chars)]
    with tempfile.TemporaryFile() as err:
        process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err)
        status, memory = wait_with_memory(process)
        err.seek(0)
        if status != 0:
            raise SystemExit(f"store-only run failed (wait status {status}): {err.read().decode()[-500:]}")
    return memory


def main() -> None:
    if sys.argv[1:2] == ["--store-only"]:
        spec, points, text_chars = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
        return write_store_only(spec, points, text_chars)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", type=Path, default=ROOT.parent / "shared" / "datasets" / "scifact")
    parser.add_argument("--sizes", type=int, nargs="+", default=[2000, 20000])
    parser.add_argument("--store", default="edge", help="edge (default) or local, under each run's data directory; or a --store value.")
    args = parser.parse_args()

    rows = []
    for size in args.sizes:
        work = scratch_dir(f"ragbatch-scale-{size}-")
        source = work / "docs.jsonl"
        documents = short_documents(args.dataset, size)
        source.write_text("".join(json.dumps(doc) + "\n" for doc in documents))
        report, memory = run_ingest(source, work / "state", args.store)
        text_chars = round(sum(len(doc["text"]) for doc in documents) / size)
        store = store_only_peak(spec_for(args.store, work / "store-only"), report["points"], text_chars)
        rows.append({"documents": size, "points": report["points"], "seconds": report["seconds"],
                     "ms_per_document": round(1000 * report["seconds"] / size, 2), "peak_rss_mib": round(memory["rss"]),
                     "peak_anon_mib": round(memory["anon"]), "peak_file_mib": round(memory["file"]),
                     "store_only_peak_rss_mib": round(store["rss"]), "store_only_peak_anon_mib": round(store["anon"]),
                     "pipeline_share_mib": round(memory["rss"] - store["rss"]),
                     "pipeline_anon_share_mib": round(memory["anon"] - store["anon"])})
    out = ROOT / "bench" / "results" / "scale.json"
    out.parent.mkdir(exist_ok=True)
    out = out.with_name(f"scale-{args.store}.json") if args.store in ("local", "edge") else out
    out.write_text(json.dumps({"store": args.store, "runs": rows}, indent=2) + "\n")
    keys = ["documents", "points", "seconds", "ms_per_document", "peak_rss_mib", "peak_anon_mib", "peak_file_mib",
            "store_only_peak_rss_mib", "store_only_peak_anon_mib", "pipeline_share_mib", "pipeline_anon_share_mib"]
    print(f"store: {args.store}\n\n| " + " | ".join(keys) + " |\n|" + " ---: |" * len(keys))
    for row in rows:
        print("| " + " | ".join(str(row[key]) for key in keys) + " |")


if __name__ == "__main__":
    main()
