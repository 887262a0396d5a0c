"""Embedding and upsert work split into shards that a Prefect task runner executes: threads in this
process (the default), or Dask / Ray worker processes, started on loopback or an existing cluster.

A shard holds whole documents, so a document's chunks and its marker stay together and the write
order of tasks/indexing.py holds per document. Workers in other processes cannot share this
process's model or store: they get specs and open each once per process. Points for an embedded
store (local:, edge:, :memory:) are written by the flow's own process, since those stores admit one
process; with a Qdrant server each shard writes its own points.
"""

from __future__ import annotations

import gc
import math
import os
import secrets
import shutil
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from prefect.futures import PrefectFuture, wait
from prefect.task_runners import TaskRunner
from pydantic import SecretStr

from tasks.child_process import end_descendants_with_this_process
from tasks.chunking import Chunk
from tasks.embedding import Embedder, open_embedder
from tasks.errors import SetupError, first_line
from tasks.settings import EmbeddingBackend, IngestParams, TaskRunnerKind, default_data_dir
from tasks.store import QdrantStore

RAY_OBJECT_STORE_BYTES = 256 * 2**20  # shards carry chunks and vectors, not corpora; Ray's default is 30 % of RAM
# Ray's longest socket path adds "/session_<date>_<time>_<microseconds>_<pid>/sockets/plasma_store"
# (at most 65 bytes) to its temp directory; Unix socket paths have at most 107.
RAY_TEMP_DIR_MAX = 107 - 65
# What a run's vLLM embedding engines on one machine take of each GPU together (vLLM's default is 0.92).
GPU_SHARE_PER_MACHINE = 0.9
# Ray leaves each instance's session directory (logs, about 200 KB) behind; the newest are kept.
RAY_SESSIONS_KEPT = 10


@dataclass(frozen=True)
class Shard:
    """Whole documents' chunks, and how many chunks each of those documents had before."""

    chunks: list[Chunk]
    previous_chunks: dict[str, int]


def split_shards(chunks: Sequence[Chunk], previous_chunks: dict[str, int], count: int) -> list[Shard]:
    """At most `count` shards of whole documents, about equally many chunks each, in input order."""
    target = math.ceil(len(chunks) / max(count, 1)) if chunks else 0
    groups: list[list[Chunk]] = []
    for chunk in chunks:
        starts_document = not groups or groups[-1][-1].doc_id != chunk.doc_id
        if starts_document and (not groups or len(groups[-1]) >= target):
            groups.append([])
        groups[-1].append(chunk)
    return [
        Shard(group, {doc_id: previous_chunks[doc_id] for doc_id in dict.fromkeys(c.doc_id for c in group)
                      if doc_id in previous_chunks})
        for group in groups
    ]


@dataclass(frozen=True)
class EmbedderSpec:
    """How to open the embedding model; `open()` loads it once per process (flow process or worker).

    `data_dir` holds the vLLM backend's caches; None is the data directory of the process that opens
    it (`RAGBATCH_DATA_DIR` there), for workers on other machines, where the flow's path may not exist."""

    backend: EmbeddingBackend
    model_name: str
    data_dir: Path | None
    device: str | None = None
    batch_size: int = 64
    gpu_share: float | None = None

    @classmethod
    def of(cls, params: IngestParams) -> EmbedderSpec:
        """The run's embedder; workers of an existing cluster keep their caches in their own data directory.
        vLLM batches by tokens itself: the batch size is sentence-transformers' alone, and is left out of a
        vLLM spec so that a run with another one reuses a worker's engine."""
        batch_size = params.embed_batch_size if params.embedding_backend == EmbeddingBackend.sentence_transformers else cls.batch_size
        return cls(params.embedding_backend, params.embedding_model, None if params.cluster_address else params.data_dir,
                   params.device, batch_size, embedding_gpu_share(params))

    def open(self) -> Embedder:
        return OPENED_EMBEDDER.get(self)


class OpenedEmbedder:
    """The embedding model this process opened last, kept for the shards that follow. Opening another
    (a long-lived worker serving a run with other settings) first lets go of this one: a vLLM engine
    holds its GPU share until it is collected, and the next engine would not find that share free."""

    def __init__(self) -> None:
        self.spec: EmbedderSpec | None = None
        self._embedder: Embedder | None = None
        self._lock = threading.Lock()  # shards on threads open it together

    def get(self, spec: EmbedderSpec) -> Embedder:
        with self._lock:
            if spec != self.spec or self._embedder is None:
                if self._embedder is not None:
                    self.spec = self._embedder = None
                    gc.collect()  # vLLM's engine sits in reference cycles
                self._embedder = open_embedder(
                    spec.backend, model_name=spec.model_name, data_dir=spec.data_dir or default_data_dir(),
                    device=spec.device, batch_size=spec.batch_size, gpu_share=spec.gpu_share)
                self.spec = spec
            return self._embedder


OPENED_EMBEDDER = OpenedEmbedder()


def embedding_gpu_share(params: IngestParams) -> float:
    """Each vLLM embedding engine's share of a GPU: `embedding_gpu_share`, or GPU_SHARE_PER_MACHINE split
    evenly among the engines this run starts on its machine: one per worker of a local cluster, else
    the run's own. vLLM checks at start that an engine's whole share is still free, so shares that add
    up to more than the GPU stop the later engines."""
    if params.embedding_gpu_share is not None:
        return params.embedding_gpu_share
    local_cluster = params.task_runner != TaskRunnerKind.threads and not params.cluster_address
    return round(GPU_SHARE_PER_MACHINE / (params.shards if local_cluster else 1), 6)


@dataclass(frozen=True)
class ServerSpec:
    """A Qdrant server that every worker connects to by itself; `open()` connects once per process."""

    url: str
    api_key: SecretStr | None = None

    def open(self) -> QdrantStore:
        return _connect(self)


@cache
def _connect(spec: ServerSpec) -> QdrantStore:
    return QdrantStore.connect(spec.url, api_key=spec.api_key)


def settled_results(futures: Sequence[PrefectFuture]) -> list[Any]:
    """The futures' results once every one has finished; a failure is raised only then. Raised at once,
    the run released its collection's lock while the other shards still wrote to it (a remote Dask
    cluster's workers go on after the run's client has closed)."""
    wait(futures)
    return [future.result() for future in futures]


@contextmanager
def task_runner(kind: TaskRunnerKind, *, workers: int, address: str | None = None, api_url: str | None = None,
                state_dir: Path | None = None) -> Iterator[TaskRunner]:
    """The Prefect task runner for the shards, started: `workers` threads, or a local Dask/Ray cluster
    of `workers` single-threaded processes on loopback that end with this process, or connected to
    the Dask scheduler / Ray cluster at `address` (at once, so an unreachable cluster ends the run
    before any work, with one line).

    Local worker processes get `api_url`, the Prefect API this run reports to, so their task runs land
    beside the flow run even when that API is the temporary server of a run without PREFECT_API_URL
    (otherwise each worker would start a temporary server of its own). A local cluster keeps its
    files in `state_dir`: Dask's worker directories in `dask/`, Ray's session (see `local_ray_settings`).
    """
    runner = _new_task_runner(kind, workers=workers, address=address, api_url=api_url, state_dir=state_dir)
    with ExitStack() as stack:
        if kind == TaskRunnerKind.dask and not address:
            stack.enter_context(_dask_worker_environment_undone())
            if state_dir:  # the cluster's own lock files, which `local_directory` leaves in the temporary directory
                import dask.config

                stack.enter_context(dask.config.set({"temporary-directory": str(state_dir / "dask")}))
        try:
            stack.enter_context(runner)
            if kind == TaskRunnerKind.dask and address:
                runner.client  # noqa: B018 -- prefect-dask connects on first use, after the first batch's work
        except OSError as exc:  # ConnectionError and TimeoutError too
            raise SetupError(_unreachable(kind, address, exc)) from None
        yield runner


@contextmanager
def _dask_worker_environment_undone() -> Iterator[None]:
    """This process's environment as it was, once the block's local Dask cluster is gone: Dask's nanny
    sets its workers' variables (`distributed.nanny.pre-spawn-environ`: MALLOC_TRIM_THRESHOLD_,
    OMP_NUM_THREADS=1 and the like, and a fixed PYTHONHASHSEED) in the environment of the process that
    starts them and leaves them there, for everything that process starts later (a vLLM engine, a
    second flow's processes)."""
    import dask.config
    import distributed  # noqa: F401  -- registers the nanny's defaults in dask.config

    names = [*dask.config.get("distributed.nanny.pre-spawn-environ", {}), "PYTHONHASHSEED"]
    before = {name: os.environ.get(name) for name in names}
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _unreachable(kind: TaskRunnerKind, address: str | None, exc: OSError) -> str:
    if not address:
        return f"cannot start a local {kind.value} cluster: {first_line(exc)}"
    hint = ""
    if kind == TaskRunnerKind.ray and "Starting Ray client server failed" in str(exc):
        # The head's client proxy forks each client's server while gRPC's fork handlers race its own
        # threads; the server dies at once (ray-project/ray#63202).
        hint = ("; the cluster's Ray client proxy lost the server it started for this run, an intermittent Ray bug: "
                "run again, and start the head node with GRPC_ENABLE_FORK_SUPPORT=false to avoid it")
    elif kind == TaskRunnerKind.ray:  # Ray's client only says it timed out
        hint = "; a Ray cluster with token authentication also needs RAY_AUTH_MODE=token and its RAY_AUTH_TOKEN here"
    return f"cannot reach the {kind.value} cluster at {address}: {first_line(exc)}{hint}"


def _new_task_runner(kind: TaskRunnerKind, *, workers: int, address: str | None, api_url: str | None,
                     state_dir: Path | None) -> TaskRunner:
    if kind == TaskRunnerKind.threads:
        from prefect.task_runners import ThreadPoolTaskRunner

        return ThreadPoolTaskRunner(max_workers=workers)
    env = {"PREFECT_API_URL": api_url} if api_url else {}
    if not address:  # a killed run's local Ray services lingered for about a minute
        end_descendants_with_this_process()
    if kind == TaskRunnerKind.dask:
        from prefect_dask import DaskTaskRunner

        if address:
            return DaskTaskRunner(address=address)
        return DaskTaskRunner(cluster_kwargs={"n_workers": workers, "threads_per_worker": 1, "processes": True,
                                              "host": "127.0.0.1", "dashboard_address": None, "env": env,
                                              "local_directory": str(state_dir / "dask") if state_dir else None})
    if address:
        return _ray_task_runner()(address=address)
    ray_environment, temp_dir = local_ray_settings(state_dir / "ray" if state_dir else None)
    # For this process and the Ray processes it starts; kept after the run, because Ray's token loader
    # caches the token for the life of the process: a later run with a new one timed out starting its instance.
    os.environ.update(ray_environment)
    if (ray_constants := sys.modules.get("ray._private.ray_constants")) is not None:
        # Ray read the variable when it was imported, which any Prefect block load does (it imports
        # every Prefect collection, prefect-ray too); this is the value Ray's node-address lookup reads.
        ray_constants.ENABLE_RAY_CLUSTER = False
    return _ray_task_runner()(init_kwargs={
        "num_cpus": workers, "include_dashboard": False, "_temp_dir": temp_dir,
        "object_store_memory": RAY_OBJECT_STORE_BYTES, "runtime_env": {"env_vars": env},
    })


def _ray_task_runner():
    try:
        from prefect_ray import RayTaskRunner
    except ImportError:
        raise SetupError("task_runner ray needs prefect-ray: pip install 'ragbatch[ray]'") from None
    return RayTaskRunner


def local_ray_settings(state_dir: Path | None) -> tuple[dict[str, str], str | None]:
    """Environment and `_temp_dir` for a Ray instance of this process's own: on loopback, with a token
    of its own, session files in `state_dir`.

    Ray replaces 127.0.0.1 with the machine's address and listens on every interface unless told it
    is not a cluster (`RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`, the setting for a single-machine Ray).
    Token authentication stays on (Ray's default for a new local instance) with a random token in
    the environment, which Ray would otherwise create and save in `~/.ray` (a token or mode the
    caller set is kept). Ray's sockets live in the session directory and a Unix socket path has at
    most 107 bytes, so a `state_dir` longer than `RAY_TEMP_DIR_MAX` leaves the session files in Ray's
    default, the system temp directory. Sessions in `state_dir` beyond the `RAY_SESSIONS_KEPT`
    newest are removed, so scheduled runs do not fill the data directory with Ray's logs.
    """
    environment = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    if not {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"} & os.environ.keys():
        environment.update(RAY_AUTH_TOKEN=secrets.token_hex(32))
    if state_dir is None or len(str(Path(state_dir).absolute())) > RAY_TEMP_DIR_MAX:
        return environment, None
    Path(state_dir).mkdir(parents=True, exist_ok=True)
    for old_session in sorted(Path(state_dir).glob("session_2*"))[:-RAY_SESSIONS_KEPT]:  # names sort by start time
        shutil.rmtree(old_session, ignore_errors=True)
    return environment, str(Path(state_dir).absolute())
