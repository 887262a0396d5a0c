"""One ingest run per collection, and one answer run per output file, at a time: advisory lock files.
And one vLLM engine starting on a machine's GPUs at a time (`waiting_for`).

Two runs writing the same collection would race on its markers and on the deletion of documents
missing from the source; two answer runs writing one output would each answer every question and
delete each other's checkpoint parts when they finish, leaving an output without some questions.
So the second run refuses with a clear message instead. A lock is a `flock` on a file (the
collection's in `<data dir>/locks/`, the output's beside it): the kernel drops it when the holder
exits, even on SIGKILL, so a crashed run never leaves a stale lock behind. It serialises the ingest
runs that share a data directory on one machine (the CLI, a local worker); ingest runs on several
machines against one Qdrant server need a Prefect concurrency limit on their deployments as well
(`tasks.concurrency`).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from tasks.errors import RagbatchError


class RunBusy(RagbatchError):
    """Another run holds the lock."""


class CollectionBusy(RunBusy):
    """Another ingest run holds the collection's lock."""


class OutputBusy(RunBusy):
    """Another answer run is writing the output."""


class RunLock:
    """An exclusive `flock` on `path` held for a run; `acquire` refuses at once rather than waiting.

    The file records its holder for the refusal message; it stays, emptied, when the lock is released.
    Removing it would race with a process that opened it just before (and, on NFS, with other clients'
    cached view of it).
    """

    busy_error: type[RunBusy] = RunBusy

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._fd: int | None = None

    def busy_message(self, holder: str) -> str:
        return f"{self.path} is held by another run ({holder})"

    def acquire(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace")
            os.close(fd)
            raise self.busy_error(self.busy_message(_describe(holder))) from None
        try:
            os.ftruncate(fd, 0)
            holder = {"pid": os.getpid(), "host": socket.gethostname(), "since": datetime.now(timezone.utc).isoformat(timespec="seconds")}
            os.pwrite(fd, json.dumps(holder).encode(), 0)
        except BaseException:  # a full disk: the lock is not held, not kept for nobody
            _unlock_and_close(fd)
            raise
        self._fd = fd
        return self

    def release(self) -> None:
        """Empty the file and drop the lock."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            try:
                os.ftruncate(fd, 0)
            finally:
                _unlock_and_close(fd)

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc_info) -> None:
        self.release()


class CollectionLock(RunLock):
    """The write lock of one collection: `<data dir>/locks/<collection>.lock`."""

    busy_error = CollectionBusy

    def __init__(self, data_dir: Path, collection: str) -> None:
        super().__init__(Path(data_dir) / "locks" / f"{collection}.lock")
        self.collection = collection

    def busy_message(self, holder: str) -> str:
        return (f"collection {self.collection!r} is being written by another ingest run ({holder}); "
                "runs of one collection go one at a time: wait for it to finish")


class OutputLock(RunLock):
    """The lock of one answer output, `.<name>.lock` beside it: runs of any data directory meet there
    (in `<data dir>/locks/`, two runs from two working directories, each with its own ./.ragbatch, both
    held it and deleted each other's parts)."""

    busy_error = OutputBusy

    def __init__(self, output: Path) -> None:
        self.output = Path(output)
        super().__init__(self.output.with_name(f".{self.output.name}.lock"))

    def busy_message(self, holder: str) -> str:
        return (f"{self.output}: another answer run is writing it ({holder}); wait for it to finish, "
                "or give another --out")


def _unlock_and_close(fd: int) -> None:
    """Drop a `flock` and close its file. Closing alone keeps the lock while a process forked meanwhile
    (vLLM's engine on CUDA) still holds a copy of the descriptor."""
    try:
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _describe(holder: str) -> str:
    try:
        info = json.loads(holder)
        return f"pid {info['pid']} on {info['host']} since {info['since']}"
    except (ValueError, KeyError, TypeError):
        return "holder unknown"


@contextmanager
def waiting_for(path: Path) -> Iterator[None]:
    """Wait for, then hold, an exclusive `flock` on `path` (created). Serialises vLLM engine starts on a
    GPU: an engine sizes its KV cache from the GPU's free memory before and after loading, so another
    engine loading meanwhile is charged to it (vllm-project/vllm#55827), and one of them fails."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        _unlock_and_close(fd)


def gpu_start_lock(cache_dir: Path) -> Path:
    """The lock file that the vLLM engines keeping their caches in `cache_dir` (those of one data
    directory: a run's own, its local cluster's workers) take to start on a GPU."""
    return Path(cache_dir) / "gpu-engine-start.lock"
