"""Embed/upsert shards: how a batch splits, the engines' GPU shares, and the ingest on local and existing
Dask and Ray clusters against one process."""

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import psutil
import pytest
from distributed import Client
from prefect import flow, task
from pydantic import ValidationError

from flows.ingest import ingest
from tasks.child_process import free_port, stop_group
from tasks.chunking import Chunk
from tasks.embedding import VLLMEmbedder
from tasks.settings import EmbeddingBackend, IngestParams, TaskRunnerKind
from tasks.sharding import (
    OPENED_EMBEDDER, RAY_SESSIONS_KEPT, EmbedderSpec, OpenedEmbedder, _unreachable, embedding_gpu_share, local_ray_settings,
    settled_results, split_shards, task_runner,
)
from tasks.store import QdrantStore

from .conftest import SAMPLE_CORPUS, completed_task_runs


def chunks_of(*sizes: int) -> list[Chunk]:
    return [Chunk(f"d{doc}", index, "text", 0, 4, None, "s", {}, "h") for doc, size in enumerate(sizes) for index in range(size)]


def test_shards_hold_whole_documents_in_order():
    chunks = chunks_of(3, 1, 4, 2, 2)
    shards = split_shards(chunks, {"d2": 6, "d4": 1}, 3)
    assert [c for shard in shards for c in shard.chunks] == chunks
    assert len(shards) <= 3
    for shard in shards:
        assert {c.doc_id for c in shard.chunks}.isdisjoint({c.doc_id for other in shards if other is not shard for c in other.chunks})
    assert sorted(p for shard in shards for p in shard.previous_chunks.items()) == [("d2", 6), ("d4", 1)]
    assert [len(shard.chunks) for shard in shards] == [4, 4, 4]


@pytest.mark.parametrize(("options", "share"), [
    ({}, 0.9),
    ({"task_runner": TaskRunnerKind.threads, "shards": 4}, 0.9),  # one engine, shared by the threads
    ({"task_runner": TaskRunnerKind.dask, "shards": 2}, 0.45),  # one engine per local worker
    ({"task_runner": TaskRunnerKind.ray, "shards": 2, "cluster_address": "ray://gpu-host:10001"}, 0.9),
    ({"task_runner": TaskRunnerKind.dask, "shards": 2, "embedding_gpu_share": 0.2}, 0.2),
])
def test_embedding_engines_on_one_machine_split_its_gpus(tmp_path, options, share):
    params = IngestParams(source=SAMPLE_CORPUS, collection="kb", data_dir=tmp_path, **options)
    assert embedding_gpu_share(params) == share


def test_a_process_keeps_one_embedding_model_and_lets_go_of_it_before_opening_another(tmp_path):
    """A long-lived worker that served a run keeps its model for the next run with the same settings; with
    other settings the old one (a vLLM engine holds its GPU share) is released before the new one opens.
    vLLM ignores the batch size, so it is not a setting of a vLLM spec. No model is loaded here."""
    import weakref

    def spec(backend: str, batch_size: int) -> EmbedderSpec:
        return EmbedderSpec.of(IngestParams(source=SAMPLE_CORPUS, collection="kb", data_dir=tmp_path,
                                            embedding_backend=backend, embed_batch_size=batch_size))

    assert spec("vllm", 32) == spec("vllm", 256) and spec("sentence-transformers", 32) != spec("sentence-transformers", 256)
    opened = OpenedEmbedder()
    first = opened.get(spec("vllm", 32))
    assert opened.get(spec("vllm", 256)) is first
    released = weakref.ref(first)
    del first
    second = opened.get(spec("sentence-transformers", 32))
    assert released() is None and opened.spec == spec("sentence-transformers", 32) and second.batch_size == 32


@pytest.mark.parametrize(("cluster_address", "cache_dir"), [(None, "flow/cache"), ("tcp://10.0.0.7:8786", "worker/cache")])
def test_vllm_caches_stay_on_the_machine_that_embeds(tmp_path, monkeypatch, cluster_address, cache_dir):
    """A worker of an existing cluster may run on another machine, where the flow's data directory does
    not exist: it keeps the vLLM engine's caches in its own (its RAGBATCH_DATA_DIR). The engine is not started."""
    params = IngestParams(source=SAMPLE_CORPUS, collection="kb", data_dir=tmp_path / "flow", embedding_backend="vllm",
                          task_runner=TaskRunnerKind.dask, cluster_address=cluster_address)
    monkeypatch.setenv("RAGBATCH_DATA_DIR", str(tmp_path / "worker"))  # as on the worker that opens the spec
    embedder = EmbedderSpec.of(params).open()
    assert isinstance(embedder, VLLMEmbedder) and embedder.cache_dir == tmp_path / cache_dir


def test_the_previous_model_is_let_go_of_before_the_next_one_opens(tmp_path, monkeypatch):
    """Released after the next one opened, a vLLM engine (in reference cycles) still held its GPU share
    while the next engine checked that its own was free. `open_embedder` is replaced: no model loads."""
    import gc
    import weakref

    import tasks.sharding

    class Engine:
        def __init__(self) -> None:
            self.cycle = self  # as vLLM's engine: only the collector frees it

    opened: list[weakref.ref] = []
    alive_when_opening: list[list[bool]] = []

    def open_embedder(backend, **options):
        alive_when_opening.append([engine() is not None for engine in opened])
        engine = Engine()
        opened.append(weakref.ref(engine))
        return engine

    monkeypatch.setattr(tasks.sharding, "open_embedder", open_embedder)
    gc.disable()
    try:
        embedder = OpenedEmbedder()
        for model in ("a", "b"):
            embedder.get(EmbedderSpec(EmbeddingBackend.vllm, model, tmp_path))
    finally:
        gc.enable()
    assert alive_when_opening == [[], [False]]


def test_never_more_shards_than_asked_for():
    assert len(split_shards(chunks_of(*[1] * 10), {}, 3)) == 3


def test_a_ray_timeout_names_token_authentication_and_not_the_client_proxy_bug():
    timed_out = _unreachable(TaskRunnerKind.ray, "ray://head:10001", TimeoutError("timed out"))
    assert timed_out.startswith("cannot reach the ray cluster at ray://head:10001: timed out")
    assert "RAY_AUTH_MODE=token" in timed_out and "intermittent Ray bug" not in timed_out


def test_one_shard_or_no_chunks():
    chunks = chunks_of(2, 2)
    assert [s.chunks for s in split_shards(chunks, {}, 1)] == [chunks]
    assert split_shards([], {}, 4) == []
    assert len(split_shards(chunks_of(9), {}, 4)) == 1  # a document is never split


def test_cluster_placement_needs_a_qdrant_server(tmp_path: Path):
    with pytest.raises(ValidationError, match="apply to a Qdrant server"):
        IngestParams(source=tmp_path, data_dir=tmp_path, replication_factor=2)
    assert IngestParams(source=tmp_path, data_dir=tmp_path, store="http://127.0.0.1:6333", shard_number=6,
                        replication_factor=2).shard_number == 6


def snapshot(store_spec: str, collection: str) -> dict[str, tuple[dict, np.ndarray]]:
    store = QdrantStore.connect(store_spec)
    try:
        return {str(r.id): (r.payload, np.asarray(r.vector["dense"])) for r in store.iter_points(collection, with_vectors=True)}
    finally:
        store.close()


def assert_same_index(one: dict, other: dict) -> None:
    assert one.keys() == other.keys()
    for point_id, (payload, vector) in one.items():
        assert other[point_id][0] == payload
        np.testing.assert_allclose(other[point_id][1], vector, atol=1e-5)


def sharded_run(corpus: Path, data_dir: Path, **execution) -> tuple:
    params = IngestParams(source=corpus, collection="kb", data_dir=data_dir, batch_docs=8, retrieval="dense", **execution)
    return ingest(params), snapshot(params.store, "kb")


@pytest.fixture(scope="module")
def one_process(prefect_api_url, tmp_path_factory) -> tuple:
    """The sample corpus indexed in the flow's own process, what every cluster run must reproduce: the
    report, the index, and the data directory (copy it before running on it)."""
    data_dir = tmp_path_factory.mktemp("one-process")
    return *sharded_run(SAMPLE_CORPUS, data_dir), data_dir


@contextmanager
def existing_dask_cluster(directory: Path) -> Iterator[str]:
    """A Dask cluster started as an operator starts one (`dask scheduler`, `dask worker`), on loopback;
    its address. Their output goes to `directory`. The workers need no Prefect settings: each task
    carries the flow run's (prefect-dask sends the settings context along)."""
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    dask = str(Path(sys.executable).with_name("dask"))
    directory.mkdir(parents=True)
    commands = {
        "scheduler": [dask, "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"],
        "workers": [dask, "worker", address, "--nworkers", "2", "--nthreads", "1", "--host", "127.0.0.1", "--no-dashboard",
                    "--local-directory", str(directory)],
    }
    started = []
    try:
        for name, command in commands.items():
            with (directory / f"{name}.log").open("w") as log:
                started.append(subprocess.Popen(command, start_new_session=True, stdout=log, stderr=log))
        with Client(address, timeout=60) as client:
            client.wait_for_workers(2, timeout=60)
        yield address
    finally:
        for process in reversed(started):
            stop_group(process, grace_seconds=10)


def completed_in(flow_run_id: str, name_like: str) -> int:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    return completed_task_runs(name_like, FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))


@pytest.mark.slow
def test_ingest_on_a_local_dask_cluster_and_an_existing_one_equals_one_process(one_process, corpus: Path, tmp_path: Path):
    single, single_index, single_dir = one_process
    opened_here = OPENED_EMBEDDER.spec
    sharded, sharded_index = sharded_run(corpus, tmp_path / "dask", task_runner=TaskRunnerKind.dask, shards=2)
    assert sharded.loaded == sharded.valid == 36 and sharded.embedded == sharded.points == single.points
    assert_same_index(single_index, sharded_index)
    # The workers load the model and measure the new collection's vector size; the flow's process does neither.
    assert OPENED_EMBEDDER.spec == opened_here
    assert completed_in(sharded.run_id, "embedding-dimension") == 1

    # Incremental: a shorter document (leftover chunks deleted) and a removed one, on a cluster that
    # was running before the flow (`cluster_address`), whose task runs land beside the flow run.
    guide = corpus / "troubleshooting-guide.txt"
    guide.write_text(guide.read_text()[:400])
    (corpus / "glossary.md").unlink()
    shutil.copytree(single_dir, tmp_path / "single")
    single, single_index = sharded_run(corpus, tmp_path / "single")
    with existing_dask_cluster(tmp_path / "workers") as address:
        sharded, sharded_index = sharded_run(corpus, tmp_path / "dask", task_runner=TaskRunnerKind.dask, shards=2,
                                             cluster_address=address)
    assert sharded.deleted == single.deleted > 0 and sharded.embedded == single.embedded > 0
    assert_same_index(single_index, sharded_index)
    assert completed_in(sharded.run_id, "embed") >= 1


def listens(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


@contextmanager
def existing_ray_cluster(directory: Path, env: dict[str, str]) -> Iterator[str]:
    """A Ray cluster started as an operator starts one (`ray start --head`, token authentication from
    `env`), on loopback, its session files in `directory`; its Ray client address."""
    client_port = free_port()
    command = [str(Path(sys.executable).with_name("ray")), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
               "--port", str(free_port()), "--ray-client-server-port", str(client_port), "--num-cpus", "2",
               "--include-dashboard", "false", "--temp-dir", str(directory), "--disable-usage-stats"]
    with (directory / "head.log").open("w") as log:
        # As deployments/README.md advises: without it the server Ray's client proxy forks for each client
        # died at once in about one run in five (ray-project/ray#63202).
        head = subprocess.Popen(command, env={**env, "GRPC_ENABLE_FORK_SUPPORT": "false"}, start_new_session=True,
                                stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 120
        while not listens(client_port):
            assert head.poll() is None and time.monotonic() < deadline, (directory / "head.log").read_text()[-2000:]
            time.sleep(0.5)
        yield f"ray://127.0.0.1:{client_port}"
    finally:
        stop_group(head, grace_seconds=10)


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("RAGBATCH_RAY_CLUSTER"),
                    reason="RAGBATCH_RAY_CLUSTER=1: starts a Ray cluster and waits out a refused connection (about 2 "
                    "minutes)")
def test_ingest_on_an_existing_ray_cluster_equals_one_process(one_process, subprocess_env, tmp_path):
    single, single_index, _ = one_process
    token = secrets.token_hex(32)
    env = {**subprocess_env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
           "RAY_USAGE_STATS_ENABLED": "0"}
    state = Path(tempfile.mkdtemp(prefix="rb-", dir="/tmp"))  # short enough for Ray's sockets
    command = [sys.executable, "-m", "flows.cli", "ingest", str(SAMPLE_CORPUS), "--collection", "kb", "--batch-docs", "8",
               "--retrieval", "dense", "--task-runner", "ray", "--shards", "2", "--json"]
    try:
        with existing_ray_cluster(state, env) as address:
            refused = subprocess.run([*command, "--cluster-address", address], capture_output=True, text=True, timeout=300,
                                     env={**env, "RAY_AUTH_MODE": "", "RAGBATCH_DATA_DIR": str(tmp_path / "refused")})
            result = subprocess.run([*command, "--cluster-address", address], capture_output=True, text=True, timeout=600,
                                    env={**env, "RAGBATCH_DATA_DIR": str(tmp_path / "ray")})
        # Ray's logs, for a failure (their session directory goes next): kept with the test's directory.
        shutil.copytree(state / "session_latest" / "logs", tmp_path / "ray-logs")
        server_logs = f"\nRay's logs: {tmp_path / 'ray-logs'}" + "".join(
            f"\n{log.name}: {log.read_text()[-3000:]}" for log in sorted((tmp_path / "ray-logs").glob("ray_client_server*.err"))
            if log.read_text().strip())
    finally:
        shutil.rmtree(state, ignore_errors=True)
    # Ray's client sends the token only when told the cluster wants one; the error says so, in one line.
    assert refused.returncode == 1 and "Traceback" not in refused.stderr, refused.stderr[-2000:]
    [line] = [line for line in refused.stderr.splitlines() if line.startswith("ragbatch: error: ")]
    assert f"cannot reach the ray cluster at {address}" in line and "RAY_AUTH_MODE=token" in line
    assert result.returncode == 0, result.stderr[-2000:] + server_logs
    assert json.loads(result.stdout.strip().splitlines()[-1])["points"] == single.points
    assert_same_index(single_index, snapshot(f"edge:{tmp_path / 'ray' / 'edge'}", "kb"))


def test_a_refused_ray_connection_names_the_servers_error():
    """Ray's client puts the server's traceback under one introducing line; the error names the cause and
    what avoids it."""
    refused = ConnectionAbortedError("Initialization failure from server:\nTraceback (most recent call last):\n"
                                     '  File "proxier.py", line 767, in Datapath\n'
                                     "RuntimeError: Starting Ray client server failed. See ray_client_server_23001.err\n")
    assert _unreachable(TaskRunnerKind.ray, "ray://head:10001", refused) == (
        "cannot reach the ray cluster at ray://head:10001: Initialization failure from server: RuntimeError: Starting Ray "
        "client server failed. See ray_client_server_23001.err; the cluster's Ray client proxy lost the server it "
        "started for this run, an intermittent Ray bug: run again, and start the head node with "
        "GRPC_ENABLE_FORK_SUPPORT=false to avoid it")


def listening(process: psutil.Process) -> set[tuple[int, str, int]]:
    """(pid, address, port) of every TCP socket that `process` or a descendant listens on."""
    found = set()
    for member in [process, *process.children(recursive=True)]:
        try:
            found |= {(member.pid, c.laddr.ip, c.laddr.port) for c in member.net_connections(kind="tcp")
                      if c.status == psutil.CONN_LISTEN}
        except psutil.NoSuchProcess:
            pass
    return found


WORKER_VARIABLES = ("MALLOC_TRIM_THRESHOLD_", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "PYTHONHASHSEED")


@pytest.mark.slow
def test_a_local_dask_cluster_listens_on_loopback_only_and_keeps_its_files_in_the_data_dir(prefect_api_url, tmp_path,
                                                                                          monkeypatch):
    """Also: the variables Dask's nanny sets for its workers in this process's environment go with the cluster."""
    for name in WORKER_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    scratch = tmp_path / "tmp"  # the temporary directory, where the cluster left dask-scratch-space/{global,purge}.lock
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    me = psutil.Process()
    before = listening(me)
    with task_runner(TaskRunnerKind.dask, workers=2, api_url=prefect_api_url, state_dir=tmp_path) as runner:
        runner.client.wait_for_workers(2)  # the cluster starts with the runner's client, on first use
        started = listening(me) - before
        assert len([path for path in (tmp_path / "dask").glob("dask-scratch-space/worker-*") if path.is_dir()]) == 2
    assert len({pid for pid, _, _ in started if pid != me.pid}) >= 2  # at least the two worker processes
    assert {address for _, address, _ in started} == {"127.0.0.1"}, started
    assert not [name for name in WORKER_VARIABLES if name in os.environ]
    assert not list(scratch.iterdir())


@pytest.mark.slow
def test_a_local_ray_instance_listens_on_loopback_only_and_keeps_its_files_in_the_data_dir(prefect_api_url, monkeypatch):
    """Ray put its services on every interface, its session files in /tmp/ray and a token in ~/.ray.
    Ray is imported first, as a Prefect block load does before a flow starts its runner."""
    import ray  # noqa: F401

    home = Path(tempfile.mkdtemp(prefix="home-"))
    state = Path(tempfile.mkdtemp(prefix="rb-", dir="/tmp"))  # short enough for Ray's sockets
    monkeypatch.setenv("HOME", str(home))
    me = psutil.Process()
    before = listening(me)
    try:
        with task_runner(TaskRunnerKind.ray, workers=2, api_url=prefect_api_url, state_dir=state):
            started = listening(me) - before
            sockets = list(state.glob("ray/session_*/sockets/*"))
        assert len({pid for pid, _, _ in started if pid != me.pid}) >= 2  # Ray's own services at least
        assert {address for _, address, _ in started} <= {"127.0.0.1", "::ffff:127.0.0.1"}, started
        assert sockets and not (home / ".ray").exists()
    finally:
        shutil.rmtree(home)
        shutil.rmtree(state)


def test_only_the_newest_ray_sessions_stay_in_the_data_dir():
    ray_dir = Path(tempfile.mkdtemp(prefix="rb-", dir="/tmp")) / "ray"  # short enough for Ray's sockets
    try:
        sessions = [ray_dir / f"session_2026-11-{day:02d}_02-00-00_000000_{100 + day}" for day in range(1, 13)]
        for session in sessions:
            (session / "logs").mkdir(parents=True)
        (ray_dir / "session_latest").symlink_to(sessions[-1])
        _, temp_dir = local_ray_settings(ray_dir)
        assert temp_dir == str(ray_dir)
        assert sorted(ray_dir.iterdir()) == sorted([*sessions[-RAY_SESSIONS_KEPT:], ray_dir / "session_latest"])
    finally:
        shutil.rmtree(ray_dir.parent)


def test_a_local_ray_instance_keeps_the_callers_token_and_a_long_data_dir_out_of_its_socket_paths(monkeypatch, tmp_path):
    """A token the caller set was replaced by a random one; a session directory too long for a Unix
    socket's 107 bytes failed Ray's start."""
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    environment, _ = local_ray_settings(None)
    assert len(environment["RAY_AUTH_TOKEN"]) == 64 and environment["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0"
    monkeypatch.setenv("RAY_AUTH_TOKEN", "the-callers")
    assert "RAY_AUTH_TOKEN" not in local_ray_settings(None)[0]
    too_long = tmp_path / ("x" * 60)
    assert local_ray_settings(too_long)[1] is None and not too_long.exists()


@pytest.mark.slow
def test_ingest_on_a_local_ray_cluster_equals_one_process(one_process, tmp_path: Path):
    single, single_index, _ = one_process
    sharded, sharded_index = sharded_run(SAMPLE_CORPUS, tmp_path / "ray", task_runner=TaskRunnerKind.ray, shards=2)
    assert sharded.loaded == sharded.valid == 36 and sharded.embedded == sharded.points == single.points
    assert_same_index(single_index, sharded_index)


@task
def _shard(seconds: float, fails: bool) -> float:
    time.sleep(seconds)
    if fails:
        raise ValueError("this shard failed")
    return seconds


def test_a_failed_shard_is_raised_once_every_other_shard_has_finished(prefect_api_url):
    """The first failure was raised at once: the run released its collection's lock while the other
    shards still wrote (on a remote Dask cluster, whose workers go on after the run's client closes)."""

    @flow
    def shards() -> bool:
        with task_runner(TaskRunnerKind.threads, workers=2) as runner:
            futures = [runner.submit(_shard, {"seconds": 0, "fails": True}), runner.submit(_shard, {"seconds": 2, "fails": False})]
            with pytest.raises(ValueError, match="this shard failed"):
                settled_results(futures)
            return futures[1].state.is_completed()

    assert shards() is True
