"""Store benchmark: qdrant-client local mode vs the edge engine, through ragbatch's QdrantStore.

Run: .venv/bin/python bench/bench_store.py [--runs local:100000 edge:100000 edge:1000000] [--queries 200]
     .venv/bin/python bench/bench_store.py --scifact [../shared/datasets/scifact]

Each run is its own process (so its peak RSS, from wait4, is its own) on a fresh directory:
384-dimension unit vectors with realistic structure (a mixture of 500 clusters, points spread
around their centre, so neighbours are not uniform noise), payload like an ingest's (doc_id,
chunk_index, source among 20 values, text). Measured: upsert points/s (batches of 1,000
PointStructs through `QdrantStore.upsert`), index build (`optimize`), top-10 query latency p50/p95
one request at a time without and with a payload filter (source = one value, 5 % of points),
recall@10 of the unfiltered queries against exact search (numpy), and reopen time (connect plus
the first query). Writes bench/results/store.json (one row per store:points, earlier rows kept).

`--scifact` checks the HNSW graph on real embeddings instead: the dataset's passages and queries
embedded with the default model (cached under the system temp directory), one edge shard with the
indexing threshold at its minimum so the graph is built even for a few thousand points (a default
collection this small is searched exhaustively), recall@10 of every query against exact search.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from scratch import scratch_dir  # bench/scratch.py: the script's own directory is on sys.path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DIM = 384
CLUSTERS = 500
BATCH = 1000
SOURCES = 20


def clustered(rng: np.random.Generator, centres: np.ndarray, count: int) -> np.ndarray:
    vectors = centres[rng.integers(0, len(centres), count)] + rng.normal(0, 0.35, (count, DIM)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def exact_top10(probes: np.ndarray, vectors: np.ndarray, block: int = 20) -> np.ndarray:
    """Ids of the 10 nearest vectors (dot product of unit vectors) of each probe, by brute force in blocks."""
    rows = []
    for start in range(0, len(probes), block):
        scores = probes[start:start + block] @ vectors.T
        top = np.argpartition(-scores, 10, axis=1)[:, :10]
        rows.append(np.take_along_axis(top, np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1), axis=1))
    return np.concatenate(rows)


def recall_at_10(hits_per_query: list, exact: np.ndarray) -> float:
    return float(np.mean([len({int(h.id) for h in hits} & set(truth.tolist())) / 10
                          for hits, truth in zip(hits_per_query, exact, strict=True)]))


def one_run(kind: str, count: int, queries: int, filtered_queries: int) -> dict:
    """One store at one size, in this process."""
    from qdrant_client import models

    from tasks.store import QdrantStore, VectorLayout

    rng = np.random.default_rng(0)
    centres = rng.normal(0, 1, (CLUSTERS, DIM)).astype(np.float32)
    vectors = np.empty((count, DIM), dtype=np.float32)
    path = scratch_dir(f"ragbatch-store-{kind}-")
    spec = f"{kind}:{path / 'db'}"
    store = QdrantStore.connect(spec)
    store.create_collection("bench", dimension=DIM, metadata={}, layout=VectorLayout(dense=True))

    upsert_s = 0.0
    for start in range(0, count, BATCH):
        block = clustered(rng, centres, min(BATCH, count - start))
        vectors[start:start + len(block)] = block
        points = [
            models.PointStruct(id=start + i, vector={"dense": block[i].tolist()},
                               payload={"doc_id": f"d{(start + i) // 4}", "chunk_index": (start + i) % 4,
                                        "source": f"s{(start + i) % SOURCES}.md", "text": f"passage {start + i}"})
            for i in range(len(block))
        ]
        clock = time.perf_counter()
        store.upsert("bench", points)
        upsert_s += time.perf_counter() - clock
    clock = time.perf_counter()
    store.optimize("bench")
    index_s = time.perf_counter() - clock

    probes = clustered(rng, centres, queries)
    only_source = models.Filter(must=[models.FieldCondition(key="source", match=models.MatchValue(value="s3.md"))])

    def request(vector: np.ndarray, query_filter=None):
        return models.QueryRequest(query=vector.tolist(), using="dense", limit=10, filter=query_filter, with_payload=False)

    def timed(requests) -> tuple[list[float], list]:
        latencies, results = [], []
        for item in requests:
            clock = time.perf_counter()
            [hits] = store.query_batch("bench", [item])
            latencies.append((time.perf_counter() - clock) * 1000)
            results.append(hits)
        return latencies, results

    plain_ms, plain_hits = timed([request(v) for v in probes])
    filtered_ms, filtered_hits = timed([request(v, only_source) for v in probes[:filtered_queries]])
    recall = recall_at_10(plain_hits, exact_top10(probes, vectors))
    assert all(int(h.id) % SOURCES == 3 for hits in filtered_hits for h in hits), "filter ignored"
    store.close()

    clock = time.perf_counter()
    store = QdrantStore.connect(spec)
    store.query_batch("bench", [request(probes[0])])
    reopen_s = time.perf_counter() - clock
    store.close()
    return {
        "store": kind, "points": count,
        "upsert_points_per_s": round(count / upsert_s), "index_build_s": round(index_s, 2),
        "query_p50_ms": round(float(np.percentile(plain_ms, 50)), 2), "query_p95_ms": round(float(np.percentile(plain_ms, 95)), 2),
        "filtered_p50_ms": round(float(np.percentile(filtered_ms, 50)), 2),
        "filtered_p95_ms": round(float(np.percentile(filtered_ms, 95)), 2),
        "recall_at_10": round(recall, 4), "reopen_s": round(reopen_s, 2),
    }


def scifact_vectors(dataset: Path) -> tuple[np.ndarray, np.ndarray]:
    """Unit vectors of the dataset's `title + text` passages and of its queries, embedded once and cached."""
    cache = Path(tempfile.gettempdir()) / f"ragbatch-bench-{dataset.name}-vectors.npz"
    if cache.exists():
        cached = np.load(cache)
        return cached["passages"], cached["queries"]
    import flows  # noqa: F401  (offline defaults)
    from tasks.embedding import SentenceTransformerEmbedder

    def read(name: str) -> list[str]:
        with open(dataset / name) as handle:
            return [f"{r.get('title') or ''}\n{r['text']}".strip() for r in map(json.loads, handle)]

    embedder = SentenceTransformerEmbedder(model_name="all-MiniLM-L6-v2")
    passages, queries = embedder.embed(read("corpus.jsonl")), embedder.embed(read("queries.jsonl"))
    np.savez(cache, passages=passages, queries=queries)
    return passages, queries


def scifact_recall(dataset: Path) -> dict:
    """HNSW recall@10 on real embeddings, on an edge shard that builds its graph regardless of size."""
    import qdrant_edge as edge

    passages, queries = scifact_vectors(dataset)
    path = scratch_dir("ragbatch-store-scifact-")
    shard = edge.EdgeShard.create(str(path), edge.EdgeConfig(
        vectors={"dense": edge.EdgeVectorParams(size=passages.shape[1], distance=edge.Distance.Cosine)},
        optimizers=edge.EdgeOptimizersConfig(indexing_threshold=1),
        hnsw_config=edge.HnswIndexConfig(m=16, ef_construct=100, full_scan_threshold=1),
    ))
    for start in range(0, len(passages), BATCH):
        shard.update(edge.UpdateOperation.upsert_points(
            [edge.Point(start + i, {"dense": v.tolist()}, None) for i, v in enumerate(passages[start:start + BATCH])]))
    clock = time.perf_counter()
    shard.optimize()
    index_s = time.perf_counter() - clock
    hits = [shard.query(edge.QueryRequest(query=edge.Query.Nearest(q.tolist(), using="dense"), limit=10)) for q in queries]
    shard.close()
    return {"dataset": dataset.name, "passages": len(passages), "queries": len(queries),
            "index_build_s": round(index_s, 2), "recall_at_10": round(recall_at_10(hits, exact_top10(queries, passages)), 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", default=["local:100000", "edge:100000", "edge:1000000"],
                        help="store:points pairs, each run in its own process.")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--filtered-queries-local", type=int, default=20,
                        help="Filtered queries in local mode (each scans every point in Python).")
    parser.add_argument("--scifact", type=Path, nargs="?", const=ROOT.parent / "shared" / "datasets" / "scifact",
                        help="HNSW recall on this BEIR dataset's real embeddings instead of the synthetic runs.")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.scifact:
        row = scifact_recall(args.scifact)
        result = ROOT / "bench" / "results" / "store-scifact.json"
        result.parent.mkdir(exist_ok=True)
        result.write_text(json.dumps(row, indent=2) + "\n")
        print(json.dumps(row))
        return

    if args.one:
        kind, count = args.one.split(":")
        filtered = args.filtered_queries_local if kind == "local" else args.queries
        print(json.dumps(one_run(kind, int(count), args.queries, filtered)))
        return

    rows = []
    for run in args.runs:
        with tempfile.TemporaryFile() as out:
            process = subprocess.Popen([sys.executable, __file__, "--one", run, "--queries", str(args.queries),
                                        "--filtered-queries-local", str(args.filtered_queries_local)], stdout=out)
            _, status, usage = os.wait4(process.pid, 0)
            out.seek(0)
            lines = out.read().decode().strip().splitlines()
        if status != 0:
            raise SystemExit(f"{run} failed")
        rows.append({**json.loads(lines[-1]), "peak_rss_mib": round(usage.ru_maxrss / 1024)})
    result = ROOT / "bench" / "results" / "store.json"
    result.parent.mkdir(exist_ok=True)
    earlier = json.loads(result.read_text()) if result.exists() else []
    fresh = {(row["store"], row["points"]) for row in rows}
    kept = [row for row in earlier if (row["store"], row["points"]) not in fresh]
    result.write_text(json.dumps(kept + rows, indent=2) + "\n")
    keys = ["store", "points", "upsert_points_per_s", "index_build_s", "query_p50_ms", "query_p95_ms",
            "filtered_p50_ms", "filtered_p95_ms", "recall_at_10", "reopen_s", "peak_rss_mib"]
    print("| " + " | ".join(keys) + " |\n|" + " --- |" * len(keys))
    for row in rows:
        print("| " + " | ".join(str(row[key]) for key in keys) + " |")


if __name__ == "__main__":
    main()
