"""Where the edge store's upsert time goes: the binding building `qdrant_edge.Point`s vs the engine's update.

Run: .venv/bin/python bench/bench_edge_upsert.py [--points 200000]

One fresh edge shard per payload shape (no payload; the 4 keys bench_store.py writes; the 12 keys an
ingest writes), 384-dimension vectors already as Python lists (as `QdrantStore.upsert` receives
them), batches of 1,000. Per point it reports the time spent constructing `Point`s and the
upsert operation in the binding (Python objects -> Rust, under the GIL) and the time in
`EdgeShard.update` (the engine: WAL, segment, payload indexes). The conversion alone sets a ceiling
on points/s that no engine setting can lift; what one payload value of each type costs in it comes
next (a string costs most: the binding tries the other types first), then what a point's vectors cost
by how they are passed (named ones are first tried as lists). Then it times writes in a second thread overlapping the
next batch's conversion, against both in turn. Then `--growth-points` points (4 keys) through
`EdgeStore.upsert` twice: never flushing the shard, and flushing every `FLUSH_INTERVAL_S` as the store
does; upsert time per point in each tenth of the load shows whether writes slow down as the shard
grows. Last, recovery after a crash: a child process loads `--crash-points` points through
`EdgeStore.upsert` (never flushing, or every `FLUSH_INTERVAL_S`) and exits without closing the store,
as a killed ingest would; this process then times opening the store and counting its points, which
replays the write-ahead log past the last flush. Writes bench/results/edge_upsert.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from scratch import scratch_dir  # bench/scratch.py: the script's own directory is on sys.path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
DIM = 384
BATCH = 1000


def store_payload(i: int) -> dict:
    """The payload bench_store.py writes."""
    return {"doc_id": f"d{i // 4}", "chunk_index": i % 4, "source": f"s{i % 20}.md", "text": f"passage {i}"}


def ingest_payload(i: int) -> dict:
    """The payload an ingest writes (tasks/indexing.py), for a 500-character chunk of a 4-chunk document."""
    from tasks.chunking import Chunk
    from tasks.indexing import chunk_payload

    chunk = Chunk(f"d{i // 4}", i % 4, "x" * 500, 0, 500, f"Title {i // 4}", f"s{i % 20}.md", {}, "cd" * 32)
    return chunk_payload(chunk, n_chunks=4, embedding_model="all-MiniLM-L6-v2")


PAYLOADS = {"none": lambda i: None, "bench_store (4 keys)": store_payload, "ingest (12 keys)": ingest_payload}


def fresh_shard():
    """A new edge shard with one dense vector and keyword indexes on doc_id and source, as EdgeStore.create_collection."""
    import qdrant_edge as edge

    shard = edge.EdgeShard.create(str(scratch_dir("ragbatch-edge-upsert-")) + "/shard",
                                  edge.EdgeConfig(vectors={"dense": edge.EdgeVectorParams(size=DIM, distance=edge.Distance.Cosine)}))
    for field in ("doc_id", "source"):
        shard.update(edge.UpdateOperation.create_field_index(field, edge.PayloadSchemaType.Keyword))
    return shard


def one_shape(name: str, points: int) -> dict:
    import qdrant_edge as edge

    rng = np.random.default_rng(0)
    shard = fresh_shard()
    payload = PAYLOADS[name]
    convert_s = update_s = 0.0
    for start in range(0, points, BATCH):
        vectors = rng.normal(size=(BATCH, DIM)).astype(np.float32).tolist()
        payloads = [payload(start + i) for i in range(BATCH)]
        clock = time.perf_counter()
        operation = edge.UpdateOperation.upsert_points(
            [edge.Point(start + i, {"dense": vectors[i]}, payloads[i]) for i in range(BATCH)])
        converted = time.perf_counter()
        shard.update(operation)
        convert_s += converted - clock
        update_s += time.perf_counter() - converted
    shard.close()
    return {"payload": name, "points": points, "convert_us_per_point": round(1e6 * convert_s / points, 1),
            "update_us_per_point": round(1e6 * update_s / points, 1),
            "points_per_s": round(points / (convert_s + update_s)), "conversion_ceiling_points_per_s": round(points / convert_s)}


VALUE_KINDS = {"bool": lambda i: i % 2 == 0, "int": lambda i: i, "float": lambda i: i + 0.5, "str": lambda i: f"s{i}"}


def value_costs(points: int) -> dict:
    """Microseconds the binding spends converting one payload entry (key and value) of each value type: `Point`s with four
    values of one type, less `Point`s with no payload, over four. The binding tries bool, then the
    integer and float types, then str, in that order, so a value's type decides its cost."""
    import gc

    import qdrant_edge as edge

    vectors = np.random.default_rng(0).normal(size=(points, DIM)).astype(np.float32).tolist()

    def convert_s(payload) -> float:
        payloads = [payload(i) for i in range(points)]
        gc.collect()
        clock = time.perf_counter()
        _ = [edge.Point(i, {"dense": vectors[i]}, payloads[i]) for i in range(points)]
        return time.perf_counter() - clock

    bare = min(convert_s(lambda i: None) for _ in range(3))
    return {kind: round(1e6 * (min(convert_s(lambda i, v=value: {f"k{k}": v(i) for k in range(4)}) for _ in range(3)) - bare)
                        / points / 4, 2)
            for kind, value in VALUE_KINDS.items()}


def vector_costs(points: int) -> dict:
    """Microseconds the binding spends converting one point's vectors (no payload), by how they are passed:
    the unnamed dense list, the store's `{"dense": list}`, and a hybrid point's dense list and BM25 sparse
    vector (12 terms). A dict is first tried as a dense and a multi-dense list, and a sparse vector as a
    dense list, each failure a Python exception, so names cost more than the floats behind them."""
    import gc

    import qdrant_edge as edge

    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(points, DIM)).astype(np.float32).tolist()
    sparse = [edge.SparseVector(indices=sorted(rng.choice(30_000, 12, replace=False).tolist()), values=[0.5] * 12)
              for _ in range(1000)]
    shapes = {"unnamed dense list": lambda i: vectors[i], "named dense (the store)": lambda i: {"dense": vectors[i]},
              "named dense + sparse (hybrid)": lambda i: {"dense": vectors[i], "sparse": sparse[i % 1000]}}

    def convert_us(shape) -> float:
        given = [shape(i) for i in range(points)]
        gc.collect()
        clock = time.perf_counter()
        _ = [edge.Point(i, given[i]) for i in range(points)]
        return 1e6 * (time.perf_counter() - clock) / points

    return {name: round(min(convert_us(shape) for _ in range(3)), 2) for name, shape in shapes.items()}


def overlap(points: int) -> dict:
    """Seconds to convert and write `points` (4-key payload) in turn vs with the writes in a second thread
    while this one converts: equal times mean `EdgeShard.update` holds the GIL."""
    import threading

    import qdrant_edge as edge

    rng = np.random.default_rng(0)
    batches = [rng.normal(size=(BATCH, DIM)).astype(np.float32).tolist() for _ in range(points // BATCH)]

    def convert(number: int):
        return edge.UpdateOperation.upsert_points([edge.Point(number * BATCH + i, {"dense": vector}, store_payload(number * BATCH + i))
                                                   for i, vector in enumerate(batches[number])])

    one = fresh_shard()
    clock = time.perf_counter()
    for number in range(len(batches)):
        one.update(convert(number))
    in_turn = time.perf_counter() - clock
    prepared = [convert(number) for number in range(len(batches))]
    other = fresh_shard()
    writer = threading.Thread(target=lambda: [other.update(operation) for operation in prepared])
    clock = time.perf_counter()
    writer.start()
    _ = [convert(number) for number in range(len(batches))]
    writer.join()
    return {"points": points, "in_turn_s": round(in_turn, 2), "overlapped_s": round(time.perf_counter() - clock, 2)}


def open_store(path: str, flush_interval_s: float | None):
    """A fresh `EdgeStore` at `path` with one dense collection "bench", flushing every `flush_interval_s` (None: never)."""
    from tasks.edge_store import EdgeStore
    from tasks.store import VectorLayout

    store = EdgeStore.open(f"edge:{path}", flush_interval_s=float("inf") if flush_interval_s is None else flush_interval_s)
    store.create_collection("bench", dimension=DIM, metadata={}, layout=VectorLayout(dense=True))
    return store


def point_batches(points: int) -> Iterator[tuple[int, list]]:
    """(first id, `models.PointStruct`s) in batches: random vectors and bench_store's 4-key payloads."""
    from qdrant_client import models

    rng = np.random.default_rng(0)
    for start in range(0, points, BATCH):
        vectors = rng.normal(size=(BATCH, DIM)).astype(np.float32).tolist()
        yield start, [models.PointStruct(id=start + i, vector={"dense": vectors[i]}, payload=store_payload(start + i))
                      for i in range(BATCH)]


def growth(points: int, flush_interval_s: float | None) -> dict:
    """`EdgeStore.upsert` of `points` 4-key points in batches, flushing every `flush_interval_s` (None: never):
    microseconds per point in each tenth, and points/s."""
    store = open_store(str(scratch_dir("ragbatch-edge-growth-")), flush_interval_s)
    tenths = [0.0] * 10
    for start, batch in point_batches(points):
        clock = time.perf_counter()
        store.upsert("bench", batch)
        tenths[start * 10 // points] += time.perf_counter() - clock
    store.close()
    return {"flush_interval_s": flush_interval_s, "points": points, "points_per_s": round(points / sum(tenths)),
            "upsert_us_per_point_by_tenth": [round(1e7 * seconds / points, 1) for seconds in tenths]}


def crash_after_load(path: str, points: int, flush_interval_s: float | None) -> None:
    """Load `points` 4-key points into a fresh edge store at `path`, then exit without closing it."""
    store = open_store(path, flush_interval_s)
    for _, batch in point_batches(points):
        store.upsert("bench", batch)
    os._exit(0)  # no close, no final flush: what a killed process leaves


def recovery(points: int, flush_interval_s: float | None) -> dict:
    """Seconds to reopen the store a crashed load of `points` left (open + exact count), and the count."""
    from tasks.edge_store import EdgeStore

    path = str(scratch_dir("ragbatch-edge-crash-"))
    interval = "never" if flush_interval_s is None else str(flush_interval_s)
    subprocess.run([sys.executable, __file__, "--crash-load", path, str(points), interval], check=True)
    clock = time.perf_counter()
    store = EdgeStore.open(f"edge:{path}")
    count = store.count("bench")
    reopen_s = time.perf_counter() - clock
    store.close()
    return {"flush_interval_s": flush_interval_s, "points": points, "reopen_s": round(reopen_s, 1), "count": count}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--points", type=int, default=200_000)
    parser.add_argument("--growth-points", type=int, default=1_000_000)
    parser.add_argument("--crash-points", type=int, default=300_000)
    parser.add_argument("--crash-load", nargs=3, metavar=("PATH", "POINTS", "INTERVAL"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.crash_load:
        path, points, interval = args.crash_load
        crash_after_load(path, int(points), None if interval == "never" else float(interval))
    from tasks.edge_store import FLUSH_INTERVAL_S

    rows = [one_shape(name, args.points) for name in PAYLOADS]
    values = value_costs(min(args.points, 40_000))
    vectors = vector_costs(min(args.points, 40_000))
    threads = overlap(min(args.points, 40_000))
    growths = [growth(args.growth_points, interval) for interval in (None, FLUSH_INTERVAL_S)]
    recoveries = [recovery(args.crash_points, interval) for interval in (None, FLUSH_INTERVAL_S)]
    out = ROOT / "bench" / "results" / "edge_upsert.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"shapes": rows, "us_per_payload_value": values, "us_per_point_vectors": vectors, "write_thread": threads, "growth": growths, "recovery": recoveries},
                              indent=2) + "\n")
    print("| payload | convert us/point | update us/point | points/s | ceiling from conversion alone |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for row in rows:
        print(f"| {row['payload']} | {row['convert_us_per_point']} | {row['update_us_per_point']} | {row['points_per_s']:,} "
              f"| {row['conversion_ceiling_points_per_s']:,} |")
    print("\n| payload value | " + " | ".join(values) + " |\n| --- |" + " ---: |" * len(values))
    print("| binding's conversion, us per value | " + " | ".join(str(cost) for cost in values.values()) + " |")
    print("\n| vectors passed as | " + " | ".join(vectors) + " |\n| --- |" + " ---: |" * len(vectors))
    print("| binding's conversion, us per point | " + " | ".join(str(cost) for cost in vectors.values()) + " |")
    print(f"\n{threads['points']:,} points, 4 keys: convert then write {threads['in_turn_s']} s; "
          f"writes in a second thread {threads['overlapped_s']} s")
    print("\n| EdgeStore.upsert, 4 keys | points/s | us/point in each tenth of the load |\n| --- | ---: | --- |")
    for row in growths:
        tenths = " ".join(str(value) for value in row["upsert_us_per_point_by_tenth"])
        flushes = "never" if row["flush_interval_s"] is None else f"every {row['flush_interval_s']} s"
        print(f"| flush {flushes} | {row['points_per_s']:,} | {tenths} |")
    print("\n| load killed before closing the store | reopen + count s | points found |\n| --- | ---: | ---: |")
    for row in recoveries:
        flushes = "never" if row["flush_interval_s"] is None else f"every {row['flush_interval_s']} s"
        print(f"| {row['points']:,} points, flushed {flushes} | {row['reopen_s']} | {row['count']:,} |")


if __name__ == "__main__":
    main()
