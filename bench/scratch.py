"""Scratch directories for benchmarks: removed when the benchmark's process exits.

A 1M-point store is about 2 GB; left in the temp directory after each run, a few sessions of
benchmarks filled the disk that the next install needed.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path


def scratch_dir(prefix: str) -> Path:
    """A new empty directory under the system temp directory, deleted (with its contents) at exit."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path
