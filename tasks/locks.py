"""One ingest run per collection at a time: an advisory lock file in the data directory. And one vLLM
engine starting on a machine's GPUs at a time (`waiting_for`).

Two runs writing the same collection would race on its markers and on the deletion of documents
missing from the source, so the second run refuses with a clear message instead. The lock is a
`flock` on `<data dir>/locks/<collection>.lock`: the kernel drops it when the holder exits, even on
SIGKILL, so a crashed run never leaves a stale lock behind. It serialises runs that share a data
directory on one machine (the CLI, a local worker); runs on several machines against one Qdrant
server need a Prefect concurrency limit on their deployments as well.
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


class CollectionBusy(RagbatchError):
    """Another run holds the collection's lock."""


class CollectionLock:
    """The write lock of one collection; `acquire` refuses at once rather than waiting."""

    def __init__(self, data_dir: Path, collection: str) -> None:
        self.collection = collection
        self.path = Path(data_dir) / "locks" / f"{collection}.lock"
        self._fd: int | None = None

    def acquire(self) -> "CollectionLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace")
            os.close(fd)
            raise CollectionBusy(
                f"collection {self.collection!r} is being written by another ingest run ({_describe(holder)}); "
                "runs of one collection go one at a time: wait for it to finish"
            ) from None
        os.ftruncate(fd, 0)
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "since": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        """Drop the lock (closing the file releases the flock); the file itself stays for the next run."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "CollectionLock":
        return self.acquire()

    def __exit__(self, *exc_info) -> None:
        self.release()


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
        os.close(fd)


def gpu_start_lock(cache_dir: Path) -> Path:
    """The lock file that the vLLM engines keeping their caches in `cache_dir` (those of one data
    directory: a run's own, its local cluster's workers) take to start on a GPU."""
    return Path(cache_dir) / "gpu-engine-start.lock"
