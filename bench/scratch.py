"""Scratch directories for benchmarks: removed when the benchmark's process exits, or is stopped with SIGTERM.

A 1M-point store is about 2 GB; left in the temp directory after each run, a few sessions of
benchmarks filled the disk that the next install needed.
"""

from __future__ import annotations

import atexit
import shutil
import signal
import sys
import tempfile
from pathlib import Path


def scratch_dir(prefix: str) -> Path:
    """A new empty directory under the system temp directory, deleted (with its contents) at exit."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:  # `kill` ends the process by SystemExit, so atexit runs
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    return path
