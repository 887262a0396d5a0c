"""Refuse to write when the data directory's disk is (nearly) full, with one clear line.

A memory-mapped store does not get an error when the disk fills: qdrant-edge keeps its write-ahead
log and segment pages in 32 MiB sparse files that fill as points arrive, and writing a page the
disk has no room for kills the process with SIGBUS, in the middle of a write and without a word
(reproduced on a small tmpfs). A Qdrant server refuses updates once free space falls under its
log's size; ragbatch checks the same way before each write, before building an index (which
rewrites the collection), before converting the bundled LLM (whose libraries fail deep inside on a
full disk) and before a run starts (Prefect's database lives there too). Files written the ordinary
way (answer and evaluation Parquet, possibly on another disk) get ENOSPC instead, also made one line.
A data directory that cannot be created (a file in its path, no permission) is refused the same way.
Files that must never be seen half-written (outputs, the edge store's aliases) go through `write_whole`.
"""

from __future__ import annotations

import errno
import glob
import os
import re
import secrets
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from tasks.errors import DataDirError, DiskSpaceError

MIB = 1024 * 1024
# Headroom kept free below every write: two WAL segments (2 x 32 MiB) and a segment page (32 MiB)
# besides, far more than one write batch (about 1 MB at 256 chunks).
MIN_FREE_BYTES = 128 * MIB


TEMPORARY_TOKEN_BYTES = 4  # of a write_whole temporary's random part: one per writer


def free_bytes(path: Path) -> int:
    """Bytes an unprivileged process may still write on the filesystem holding `path` (or, while
    `path` does not exist yet, its nearest existing parent)."""
    path = Path(path).absolute()
    while not path.exists():
        path = path.parent
    stats = os.statvfs(path)
    return stats.f_bavail * stats.f_frsize


def allocated_bytes(path: Path) -> int:
    """Disk blocks the files below `path` occupy (sparse files count what is written, not their size)."""
    return sum(entry.stat().st_blocks * 512 for entry in Path(path).rglob("*") if entry.is_file())


def require_free_space(path: Path, needed: int, action: str) -> None:
    """Raise `DiskSpaceError` unless the disk of `path` has at least `needed` bytes free."""
    free = free_bytes(path)
    if free < needed:
        raise DiskSpaceError(
            f"{action}: only {free / MIB:.0f} MiB free on the disk of {path}, at least {needed / MIB:.0f} MiB "
            "needed to write safely (free some space, or set RAGBATCH_DATA_DIR / --store to another disk)"
        )


def prepare_data_dir(path: Path) -> None:
    """Create the data directory, or raise `DataDirError` naming it when it cannot be created or written."""
    path = Path(path).absolute()
    problem = _data_dir_problem(path)
    if problem:
        raise DataDirError(f"cannot use {path} as the data directory: {problem}; "
                           "set --data-dir or RAGBATCH_DATA_DIR to a directory you can write")


def _data_dir_problem(path: Path) -> str | None:
    """Why `path` cannot be ragbatch's data directory (creating it if need be), or None if it can."""
    existing = next(parent for parent in (path, *path.parents) if parent.exists())
    if not existing.is_dir():
        return f"{existing} is not a directory"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return exc.strerror.lower()
    if os.access(path, os.W_OK | os.X_OK):
        return None
    return "read-only file system" if os.statvfs(path).f_flag & os.ST_RDONLY else "permission denied"


@contextmanager
def no_space_is_one_line(path: Path, action: str) -> Iterator[None]:
    """Turn a write failing with ENOSPC (no space left on the device) into a one-line `DiskSpaceError`."""
    try:
        yield
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
        raise DiskSpaceError(f"{action}: no space left on the disk of {path}; free some space and run again") from None


def write_whole(path: Path, write: Callable[[Path], None]) -> None:
    """Replace `path` whole or not at all: `write` fills a temporary file beside it, named for this
    writer alone (two writers of one path never mix their bytes; the last rename wins) and removed if
    the write fails; it is flushed to the disk and renamed over `path`, and the rename flushed too.
    Readers and a crash see the old or the new content, never a mix, and a power loss after a caller
    deletes what the file replaces (answer parts, once merged) still finds it."""
    temporary = path.with_name(f"{path.name}.{os.getpid()}-{secrets.token_hex(TEMPORARY_TOKEN_BYTES)}.tmp")
    try:
        write(temporary)
        with open(temporary, "rb") as written:
            os.fsync(written.fileno())
        temporary.replace(path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def remove_stale_temporaries(path: Path) -> None:
    """Delete the temporaries `write_whole` left beside `path` when its process was killed mid-write (of
    this path only); the caller must be the path's only writer (holding its lock)."""
    mine = re.compile(re.escape(path.name) + rf"\.\d+-[0-9a-f]{{{2 * TEMPORARY_TOKEN_BYTES}}}\.tmp")
    for stale in path.parent.glob(f"{glob.escape(path.name)}.*.tmp"):
        if mine.fullmatch(stale.name):
            stale.unlink(missing_ok=True)
