"""Crashes and store failures: an ingest killed part-way and run again leaves the same index as one
clean run; an index build killed part-way leaves nothing behind; an unreachable or silent store is
retried with backoff, then fails in one line; a failed write deletes nothing.

(The answer flow's SIGKILL-and-resume test is in test_answer_flow.py; running out of retries on an
unreachable store is in test_steps.py.)
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from datetime import datetime, timezone

import numpy as np
import pytest

from flows.ingest import ingest
from tasks import indexing, steps
from tasks.chunking import Chunk, TokenChunker
from tasks.disk import MIB, allocated_bytes
from tasks.edge_store import EdgeStore
from tasks.errors import StoreUnavailable
from tasks.settings import IngestParams
from tasks.sources import SourceRow
from tasks.store import QdrantStore, VectorLayout

from .conftest import ROOT, completed_task_runs
from .test_concurrency import small_corpus, snapshot


def completed_upserts(since: datetime) -> int:
    """Upsert task runs completed in ingest runs started after `since` (tests run one at a time)."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterStartTime

    return completed_task_runs("upsert", FlowRunFilter(start_time=FlowRunFilterStartTime(after_=since)))


@pytest.mark.slow
def test_an_ingest_killed_after_some_batches_and_run_again_equals_a_clean_run(tmp_path, subprocess_env, data_dir):
    corpus = small_corpus(tmp_path / "corpus", 40)
    started = datetime.now(timezone.utc)
    process = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "ingest", str(corpus), "--collection", "kb", "--batch-docs", "2"],
        env=subprocess_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 300
        while completed_upserts(started) < 3 and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert process.poll() is None, "the run ended before it could be killed: " + process.stderr.read().decode()[-2000:]
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()

    params = IngestParams(source=corpus, collection="kb", data_dir=data_dir)
    partial = snapshot(params.store, "kb")
    indexed_before = {doc_id for doc_id, chunk_index, *_ in partial.values() if chunk_index == 0}
    assert 6 <= len(indexed_before) < 40  # killed part-way: some batches written, not all

    again = ingest(params)  # the lock and the embedded store were freed by the kernel with the process
    assert again.unchanged >= len(indexed_before) - 2  # done documents are not re-embedded (the last batch may be half-written)
    assert again.loaded == 40 and again.quarantined == 0

    clean_dir = tmp_path / "clean"
    clean = ingest(IngestParams(source=corpus, collection="kb", data_dir=clean_dir))
    expected = snapshot(IngestParams(source=corpus, data_dir=clean_dir).store, "kb")
    assert snapshot(params.store, "kb") == expected  # same point ids, count, documents, payload hashes
    assert again.points == clean.points == len(expected)


OPTIMIZE = "import sys; from tasks.edge_store import EdgeStore; EdgeStore.open(sys.argv[1]).optimize('c')"


def scratch_bytes(path) -> int:
    """Bytes below `path` while a build may be renaming and deleting its files."""
    try:
        return allocated_bytes(path)
    except FileNotFoundError:
        return 0


def test_an_index_build_killed_part_way_leaves_no_half_built_copy(tmp_path):
    """qdrant-edge builds the optimized segments in the shard's temp_segments and 0.9 never removes
    what a killed build left there (a copy of the collection: gigabytes at a million points)."""
    from qdrant_client import models

    spec = f"edge:{tmp_path}"
    store = EdgeStore.open(spec)
    store.create_collection("c", dimension=384, metadata={}, layout=VectorLayout(dense=True))
    vectors = np.random.default_rng(0).normal(size=(20_000, 384)).astype(np.float32)
    for start in range(0, len(vectors), 1000):
        store.upsert("c", [models.PointStruct(id=i, vector={"dense": vectors[i].tolist()}, payload={"doc_id": f"d{i}"})
                           for i in range(start, start + 1000)])
    store.close()

    scratch = tmp_path / "collections" / "c" / "shard" / "temp_segments"
    build = subprocess.Popen([sys.executable, "-c", OPTIMIZE, spec], cwd=ROOT)
    deadline = time.monotonic() + 120
    while scratch_bytes(scratch) <= MIB:  # until the build is copying the points
        assert build.poll() is None and time.monotonic() < deadline, "the index build ended before it could be killed"
        time.sleep(0.05)
    build.send_signal(signal.SIGKILL)
    build.wait()
    assert allocated_bytes(scratch) > MIB

    store = EdgeStore.open(spec)
    try:
        assert store.count("c") == 20_000
        assert allocated_bytes(scratch) == 0
        store.optimize("c")
        [hits] = store.query_batch("c", [models.QueryRequest(query=vectors[7].tolist(), using="dense", limit=1)])
        assert hits[0].id == 7
    finally:
        store.close()


def test_a_store_that_accepts_but_never_answers_times_out_with_one_retryable_line():
    with socket.socket() as silent:  # the kernel completes connections into the backlog; nobody ever answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        store = QdrantStore.connect(f"http://127.0.0.1:{silent.getsockname()[1]}", timeout=1)
        started = time.monotonic()
        with pytest.raises(StoreUnavailable) as error:
            store.resolve("kb")
    assert time.monotonic() - started < 30
    message = str(error.value)
    assert message.startswith("cannot reach Qdrant at http://127.0.0.1:") and "timed out" in message and "\n" not in message


class FlakyStore(QdrantStore):
    """A real in-memory Qdrant whose next `failures` writes fail as an unreachable server's would."""

    failures = 0

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.writes: list[tuple[str, list]] = []

    def upsert(self, collection, points):
        self.writes.append(("upsert", [p.id for p in points]))
        if self.failures:
            self.failures -= 1
            raise StoreUnavailable("cannot reach Qdrant at :memory: (writing points): connection refused")
        super().upsert(collection, points)

    def delete(self, collection, ids):
        self.writes.append(("delete", list(ids)))
        super().delete(collection, ids)


def changed_chunks(store, embedder, tokenizer, texts: dict[str, str]) -> tuple[list[Chunk], np.ndarray, dict[str, int]]:
    """Chunks, vectors and previous chunk counts for (re)writing `texts` into collection "kb" of `store`."""
    if not store.client.collection_exists("kb"):
        store.create_collection("kb", dimension=embedder.dimension, metadata={})
    rows = [SourceRow(doc_id, doc_id, text, source=doc_id) for doc_id, text in texts.items()]
    plan = indexing.plan_batch(rows, indexing.read_markers(store, "kb", list(texts)), "f")
    chunker = TokenChunker(tokenizer=tokenizer, chunk_tokens=32, overlap_tokens=0)
    chunks = chunker.chunk(plan.changed)
    return chunks, embedder.embed([c.embedding_text for c in chunks]), plan.previous_chunks


def write(store, chunks, vectors, previous) -> int:
    return indexing.write_documents(store, "kb", indexing.build_points(chunks, vectors, embedding_model="m"), previous)


def test_a_failed_write_deletes_nothing_and_the_old_version_stays_whole(embedder, tokenizer):
    store = FlakyStore.connect(":memory:")
    long_text = " ".join(f"Sentence {i} about the anemometer bearings." for i in range(40))
    write(store, *changed_chunks(store, embedder, tokenizer, {"manual": long_text}))
    before = dict(store.iter_payload_field("kb", "content_hash"))
    assert len(before) > 4

    store.failures, store.writes = 1, []
    shorter = changed_chunks(store, embedder, tokenizer, {"manual": " ".join(long_text.split()[:60])})
    with pytest.raises(StoreUnavailable):
        write(store, *shorter)
    assert [kind for kind, _ in store.writes] == ["upsert"]  # the failed body write; no delete was attempted
    assert dict(store.iter_payload_field("kb", "content_hash")) == before

    write(store, *shorter)  # the store is back: writing again completes the new version
    assert [kind for kind, _ in store.writes] == ["upsert", "upsert", "delete", "upsert"]
    assert store.count("kb") == len(shorter[0]) < len(before)


def test_chunks_a_crashed_longer_write_left_go_with_the_next_shorter_version(embedder, tokenizer):
    """A run crashed after a longer version's chunks, before its marker, which still counted the old ones:
    a later, shorter version deleted up to that count, and the crashed write's last chunks stayed,
    retrievable, for good. Likewise for a document whose first write crashed (no marker at all)."""
    store = QdrantStore.connect(":memory:")

    def text(sentences: int) -> str:
        return " ".join(f"Sentence {i} about the anemometer bearings." for i in range(sentences))

    write(store, *changed_chunks(store, embedder, tokenizer, {"manual": text(10)}))
    for crashed in ({"manual": text(40)}, {"manual": text(25)}, {"fresh": text(30)}):  # two crashes in a row, then a new document's
        chunks, vectors, _ = changed_chunks(store, embedder, tokenizer, crashed)
        store.upsert("kb", [p for p in indexing.build_points(chunks, vectors, embedding_model="m") if p.payload["chunk_index"] != 0])
    shorter = changed_chunks(store, embedder, tokenizer, {"manual": text(3), "fresh": text(2)})
    write(store, *shorter)
    stored = sorted((doc_id, point_id) for point_id, doc_id in store.iter_payload_field("kb", "doc_id"))
    assert stored == sorted((chunk.doc_id, indexing.point_id(chunk.doc_id, chunk.chunk_index)) for chunk in shorter[0])


def test_a_deletion_cut_short_leaves_no_marker_over_a_partly_deleted_document(tokenizer):
    """Markers went last: a run that died between deletion batches left markers over documents whose
    chunks were gone, and a later run with those documents unchanged skipped them for good."""

    class DiesOnTheSecondDelete(FlakyStore):
        deletes = 0

        def delete(self, collection, ids):
            self.deletes += 1
            if self.deletes == 2:
                raise StoreUnavailable("cannot reach Qdrant at :memory: (deleting points): connection refused")
            super().delete(collection, ids)

    store = DiesOnTheSecondDelete.connect(":memory:")
    store.create_collection("kb", dimension=8, metadata={})
    rows = [SourceRow(f"d{i}", f"d{i}", f"The anemometer {i} turns. Its bearings wear out. Grease them every year.", source="s")
            for i in range(400)]
    chunks = TokenChunker(tokenizer=tokenizer, chunk_tokens=8, overlap_tokens=0).chunk(indexing.plan_batch(rows, {}, "f").changed)
    write(store, chunks, np.random.default_rng(0).random((len(chunks), 8), dtype=np.float32), {})
    assert store.count("kb") > 1000  # more than one deletion batch
    with pytest.raises(StoreUnavailable):
        indexing.delete_missing_documents(store, "kb", set())  # the source was empty this time
    stored = {point_id for point_id, _ in store.iter_payload_field("kb", "doc_id")}
    markers = indexing.read_markers(store, "kb", [row.doc_id for row in rows])
    assert len(stored) < len(chunks) and all(indexing.point_id(doc_id, index) in stored
                                             for doc_id, marker in markers.items() for index in range(marker.n_chunks))


def test_store_steps_back_off_between_retries_and_then_succeed(prefect_api_url, embedder, tokenizer):
    from prefect import get_client

    store = FlakyStore.connect(":memory:")
    chunks, vectors, previous = changed_chunks(store, embedder, tokenizer, {"note": "Grease the anemometer bearings yearly."})
    store.failures = 2
    state = steps.upsert(store, "kb", chunks, vectors, previous, embedding_model="m", layout=VectorLayout(), bm25=None,
                         return_state=True)
    assert state.is_completed() and store.count("kb") == len(chunks)
    with get_client(sync_client=True) as client:
        run = client.read_task_run(state.state_details.task_run_id)
        retries = [s for s in client.read_task_run_states(run.id) if s.name == "AwaitingRetry"]
    assert run.run_count == 3
    waits = [(s.state_details.scheduled_time - s.timestamp).total_seconds() for s in retries]
    assert len(waits) == 2 and waits[0] >= 0.9 and waits[1] >= 1.9  # 1 s, then 2 s
