"""Two engine settings that would speed up an edge bulk load, and what each would cost.

Run: .venv/bin/python bench/bench_edge_indexes.py [--points 300000]

Each variant loads `--points` points of bench_store.py's clustered 384-dimension vectors with its
4-key payload into a fresh shard (batches of 1,000, a flush every 5 s as `EdgeStore` does), then
builds the indexes as an ingest does at its end:

- "the store": the doc_id and source keyword indexes created with the collection, so every write
  keeps them up to date, and a write-ahead log (what `EdgeStore` does);
- "indexes at optimize": the keyword indexes created after the last write, just before `optimize`
  (so the HNSW graph still links points by their values);
- "no write-ahead log": the store's indexes, on a shard created with `wal_enabled=False` (writes
  are durable only once flushed).

Reported per variant: load points/s (conversion and update), seconds to create the indexes after
the load, seconds in `optimize`, their total, and the p50 and recall@10 of filtered queries (one
source of 20) against exact filtered search. The variants run A B C C B A, so a drift of the
machine shows. Writes bench/results/edge_indexes.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from bench_store import CLUSTERS, SOURCES, clustered, exact_top10  # bench/ is on sys.path
from scratch import scratch_dir

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
DIM = 384
BATCH = 1000
PROBES = 200


def create_indexes(shard) -> None:
    import qdrant_edge as edge

    from tasks.edge_store import INDEXED_FIELDS

    for field in INDEXED_FIELDS:
        shard.update(edge.UpdateOperation.create_field_index(field, edge.PayloadSchemaType.Keyword))


VARIANTS = {"the store": (True, True), "indexes at optimize": (False, True), "no write-ahead log": (True, False)}


def one_run(points: int, variant: str) -> dict:
    import qdrant_edge as edge

    from tasks.edge_store import FLUSH_INTERVAL_S

    indexes_first, wal = VARIANTS[variant]
    shard = edge.EdgeShard.create(str(scratch_dir("ragbatch-edge-indexes-") / "shard"),
                                  edge.EdgeConfig(vectors={"dense": edge.EdgeVectorParams(size=DIM, distance=edge.Distance.Cosine)},
                                                  wal_enabled=wal))
    if indexes_first:
        create_indexes(shard)
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 1, (CLUSTERS, DIM)).astype(np.float32)
    vectors = np.empty((points, DIM), dtype=np.float32)
    load_s, flushed_at = 0.0, time.monotonic()
    for start in range(0, points, BATCH):
        block = clustered(rng, centres, min(BATCH, points - start))
        vectors[start:start + len(block)] = block
        rows = block.tolist()
        payloads = [{"doc_id": f"d{(start + i) // 4}", "chunk_index": (start + i) % 4, "source": f"s{(start + i) % SOURCES}.md",
                     "text": f"passage {start + i}"} for i in range(len(rows))]
        clock = time.perf_counter()
        shard.update(edge.UpdateOperation.upsert_points([edge.Point(start + i, {"dense": row}, payload)
                                                         for i, (row, payload) in enumerate(zip(rows, payloads))]))
        if time.monotonic() - flushed_at >= FLUSH_INTERVAL_S:
            shard.flush()
            flushed_at = time.monotonic()
        load_s += time.perf_counter() - clock
    clock = time.perf_counter()
    if not indexes_first:
        create_indexes(shard)
    create_s = time.perf_counter() - clock
    clock = time.perf_counter()
    shard.optimize()
    optimize_s = time.perf_counter() - clock

    probes = clustered(rng, centres, PROBES)
    one_source = edge.Filter(must=[edge.FieldCondition(key="source", match=edge.MatchValue("s3.md"))])
    latencies, found = [], []
    for probe in probes:
        clock = time.perf_counter()
        hits = shard.query(edge.QueryRequest(limit=10, query=edge.Query.Nearest(probe.tolist(), using="dense"),
                                             filter=one_source, with_payload=False, with_vector=False))
        latencies.append(1000 * (time.perf_counter() - clock))
        found.append({int(hit.id) for hit in hits})
    shard.close()
    in_source = np.nonzero(np.arange(points) % SOURCES == 3)[0]
    truth = in_source[exact_top10(probes, vectors[in_source])]
    recall = float(np.mean([len(hits & set(top.tolist())) / 10 for hits, top in zip(found, truth, strict=True)]))
    return {"variant": variant, "points": points,
            "load_points_per_s": round(points / load_s), "load_s": round(load_s, 1), "create_indexes_s": round(create_s, 2),
            "optimize_s": round(optimize_s, 1), "total_s": round(load_s + create_s + optimize_s, 1),
            "filtered_p50_ms": round(float(np.percentile(latencies, 50)), 2), "filtered_recall_at_10": round(recall, 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--points", type=int, default=300_000)
    args = parser.parse_args()
    order = list(VARIANTS)
    rows = [one_run(args.points, variant) for variant in order + order[::-1]]
    out = ROOT / "bench" / "results" / "edge_indexes.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(rows, indent=2) + "\n")
    print("| variant | load points/s | create indexes s | optimize s | total s | filtered p50 ms | filtered recall@10 |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for row in rows:
        print(f"| {row['variant']} | {row['load_points_per_s']:,} | {row['create_indexes_s']} | {row['optimize_s']} | {row['total_s']} "
              f"| {row['filtered_p50_ms']} | {row['filtered_recall_at_10']} |")


if __name__ == "__main__":
    main()
