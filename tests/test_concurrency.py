"""Concurrent runs: one writer per collection, a clear message for a second process on the embedded
store, and readers that never see a half-built index during a rebuild."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from flows.ingest import ingest
from tasks import indexing
from tasks.chunking import TokenChunker
from tasks.ingest import finish_rebuild, prepare_target
from tasks.locks import CollectionBusy, CollectionLock, RunLock, gpu_start_lock, waiting_for
from tasks.retrieval import Retriever
from tasks.settings import IngestParams, RetrievalMode
from tasks.sources import batched, read_rows
from tasks.store import QdrantStore, VectorLayout

TOPICS = ["wind speed", "rain gauge", "solar panel", "battery", "firmware", "humidity", "mounting pole", "data logger"]


def small_corpus(root: Path, n: int = 16) -> Path:
    """n short documents, enough for several batches without much embedding work."""
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        topic = TOPICS[i % len(TOPICS)]
        (root / f"doc-{i:02d}.txt").write_text(f"Note {i} about the {topic}.\n\nCheck the {topic} of station {i} weekly.")
    return root


def snapshot(spec: str, alias: str) -> dict[str, tuple]:
    """point id -> (doc_id, chunk_index, doc_hash, content_hash) for every point behind the alias."""
    store = QdrantStore.connect(spec)
    try:
        fields = ["doc_id", "chunk_index", "doc_hash", "content_hash"]
        return {str(r.id): tuple(r.payload[f] for f in fields) for r in store.iter_points(alias, fields=fields)}
    finally:
        store.close()


def run_cli(*args: str, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "flows.cli", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_a_second_run_of_a_collection_refuses_while_the_first_holds_it(prefect_api_url, tmp_path, data_dir):
    params = IngestParams(source=small_corpus(tmp_path / "corpus", 4), collection="kb", data_dir=data_dir)
    with CollectionLock(data_dir, "kb"):
        with pytest.raises(CollectionBusy) as busy:
            ingest(params)
    message = str(busy.value)
    assert message.startswith(f"collection 'kb' is being written by another ingest run (pid {os.getpid()} on ")
    assert "wait for it to finish" in message and "\n" not in message
    assert not (data_dir / "runs").exists()  # refused before reading or writing anything
    assert ingest(params).points == 4  # the lock is free again once the holder let go


def test_the_lock_dies_with_its_process_even_on_sigkill(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from tasks.locks import CollectionLock; "
         "CollectionLock(sys.argv[1], 'kb').acquire(); print('held', flush=True); time.sleep(120)", str(tmp_path)],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(CollectionBusy, match=f"pid {holder.pid} on "):
            CollectionLock(tmp_path, "kb").acquire()
        assert CollectionLock(tmp_path, "other").acquire()  # other collections are not affected
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    CollectionLock(tmp_path, "kb").acquire().release()



def test_a_lock_file_names_its_holder_and_stays_empty_for_the_next_run(tmp_path):
    path = tmp_path / "run.lock"
    with RunLock(path):
        assert json.loads(path.read_text())["pid"] == os.getpid()
    assert path.read_text() == ""
    RunLock(path).acquire().release()


def test_engines_start_on_a_gpu_one_at_a_time(tmp_path):
    """vLLM engines of one data directory start on a GPU in turn (the lock alone: no GPU here); a second
    process waits for the first to let go, even when it was killed."""
    lock = gpu_start_lock(tmp_path / "cache")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from tasks.locks import waiting_for; "
         "lock = waiting_for(Path(sys.argv[1])); lock.__enter__(); print('held', flush=True); time.sleep(120)", str(lock)],
        stdout=subprocess.PIPE, text=True,
    )
    entered = threading.Event()

    def start_engine() -> None:
        with waiting_for(lock):
            entered.set()

    try:
        assert holder.stdout.readline().strip() == "held"
        waiter = threading.Thread(target=start_engine)
        waiter.start()
        assert not entered.wait(1.0)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert entered.wait(10.0)
    waiter.join()


@pytest.mark.slow
def test_two_runs_started_together_are_serialised_and_the_index_is_consistent(tmp_path, subprocess_env, data_dir):
    """Both runs start at once on one data directory: either the second refuses with the lock's one-line
    message, or (when the first was already done) it runs after it; the index equals a clean run."""
    corpus = small_corpus(tmp_path / "corpus")
    runs = [run_cli("ingest", str(corpus), "--collection", "kb", "--batch-docs", "4", env=subprocess_env) for _ in range(2)]
    results = [(run.wait(timeout=600), *run.communicate()) for run in runs]
    assert any(code == 0 for code, _, _ in results), [err[-2000:] for _, _, err in results]
    for code, _, err in results:
        assert "Traceback" not in err
        if code != 0:
            [line] = [line for line in err.splitlines() if line.startswith("ragbatch: error: ")]
            assert "collection 'kb' is being written by another ingest run" in line

    clean_dir = tmp_path / "clean"
    ingest(IngestParams(source=corpus, collection="kb", data_dir=clean_dir))
    clean = snapshot(f"edge:{clean_dir / 'edge'}", "kb")
    assert snapshot(f"edge:{data_dir / 'edge'}", "kb") == clean and len(clean) == 16


@pytest.mark.slow
def test_a_second_process_on_the_embedded_store_gets_one_clear_line(tmp_path, subprocess_env, data_dir):
    corpus = small_corpus(tmp_path / "corpus", 2)
    store = QdrantStore.connect(f"edge:{data_dir / 'edge'}")  # this test process holds the default embedded store
    try:
        code = run_cli("ingest", str(corpus), "--collection", "other", env=subprocess_env)
        _, err = code.communicate(timeout=600)
    finally:
        store.close()
    assert code.returncode == 1 and "Traceback" not in err
    [line] = [line for line in err.splitlines() if line.startswith("ragbatch: error: ")]
    assert f"the embedded store {data_dir / 'edge'} is in use by another process" in line
    assert "one process at a time" in line


def test_a_reader_of_the_alias_never_sees_an_error_or_an_empty_result_during_a_rebuild(tmp_path, embedder, tokenizer):
    """A rebuild written in the ingest flow's order (new physical collection, batches, delete missing,
    one alias move, drop the old collection) while a thread queries the alias in a loop.

    The embedded store admits one client per process, so reader and writer share one QdrantStore
    here, as threads. What this pins is ragbatch's side: readers are only ever pointed at a complete
    collection. The atomicity of the alias move on a Qdrant server is Qdrant's own guarantee; there is
    no server to test it against here.
    """
    corpus = small_corpus(tmp_path / "corpus", 24)
    store = QdrantStore.connect(f"local:{tmp_path / 'qdrant'}")
    chunker = TokenChunker(tokenizer=tokenizer, chunk_tokens=64, overlap_tokens=8)
    fingerprint = indexing.index_fingerprint(embedding_model=embedder.model_name, chunk_tokens=64, chunk_overlap=8)

    def build(rebuild: bool) -> str:
        target = prepare_target(store, "kb", rebuild=rebuild, embedding_model=embedder.model_name,
                                dimension=lambda: embedder.dimension, chunk_tokens=64, chunk_overlap=8)
        seen: set[str] = set()
        for batch in batched(read_rows(corpus), 4):
            seen.update(row.doc_id for row in batch)
            plan = indexing.plan_batch(batch, indexing.read_markers(store, target.collection, [r.doc_id for r in batch]), fingerprint)
            chunks = chunker.chunk(plan.changed)
            vectors = embedder.embed([c.embedding_text for c in chunks])
            points = indexing.build_points(chunks, vectors, embedding_model=embedder.model_name)
            indexing.write_documents(store, target.collection, points, plan.previous_chunks)
        indexing.delete_missing_documents(store, target.collection, seen)
        if target.is_rebuild:
            finish_rebuild(store, target)
        return target.collection

    first = build(rebuild=False)
    expected = store.count("kb")
    layout = VectorLayout.from_metadata(store.readable_collection("kb"))
    retriever = Retriever("kb", RetrievalMode.dense, layout, embedder=embedder)
    requests = retriever.requests(["How often should the rain gauge be checked?"], [None], top_k=3)
    outcomes: list[tuple[str, int | str]] = []
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            try:
                [hits] = store.query_batch("kb", requests)
                outcomes.append((store.resolve("kb"), len(hits)))
            except Exception as exc:  # the assertion below reports it
                outcomes.append(("error", f"{type(exc).__name__}: {exc}"))

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        second = build(rebuild=True)
        deadline = time.monotonic() + 30
        while not any(name == second for name, _ in outcomes) and time.monotonic() < deadline:
            thread.join(0.05)  # keep reading until the new collection has served queries
    finally:
        stop.set()
        thread.join()
    try:
        assert second != first and store.physical_collections("kb") == [second]
        assert store.count("kb") == expected
    finally:
        store.close()
    assert [o for o in outcomes if o[0] == "error" or o[1] != 3] == []
    assert {name for name, _ in outcomes} == {first, second} and len(outcomes) > 10


def test_a_lock_is_released_also_while_a_process_forked_under_it_lives(tmp_path):
    """vLLM forks its engine process on CUDA; the fork holds a copy of every open descriptor, and closing
    the parent's alone kept the flock: the next GPU engine start waited forever, a released collection
    stayed busy. A holder record that cannot be written (a full disk) kept the lock for nobody."""
    import multiprocessing
    import resource

    def fork_while_held() -> multiprocessing.Process:
        child = multiprocessing.get_context("fork").Process(target=time.sleep, args=(30,), daemon=True)
        child.start()
        return child

    children = []
    try:
        with waiting_for(gpu_start_lock(tmp_path)):
            children.append(fork_while_held())
        started = threading.Event()

        def second_engine_start() -> None:
            with waiting_for(gpu_start_lock(tmp_path)):
                started.set()

        threading.Thread(target=second_engine_start, daemon=True).start()
        assert started.wait(10), "the second engine start still waits for the first"
        lock = CollectionLock(tmp_path, "docs").acquire()
        children.append(fork_while_held())
        lock.release()
        CollectionLock(tmp_path, "docs").acquire().release()
    finally:
        for child in children:
            child.kill()
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (0, limit[1]))  # writing the holder record fails
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        with pytest.raises(OSError):
            CollectionLock(tmp_path, "full").acquire()
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limit)
        signal.signal(signal.SIGXFSZ, previous)
    CollectionLock(tmp_path, "full").acquire().release()


def test_a_lock_file_left_with_a_longer_record_names_its_new_holder(tmp_path):
    """A killed holder's record stays in the file; a shorter new one written over it kept its tail."""
    path = tmp_path / "kb.lock"
    path.write_text(json.dumps({"pid": 99999999, "host": "a-very-long-hostname-of-the-killed-holder.example", "since": "2026-01-01"}))
    with RunLock(path):
        assert json.loads(path.read_text())["pid"] == os.getpid()
