"""Keep a long batch run's resident memory from creeping up batch after batch (glibc's allocator)."""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_MMAP_THRESHOLD = -3  # mallopt parameter, <malloc.h>
MMAP_THRESHOLD_BYTES = 128 * 1024  # glibc's starting value, kept fixed


def fix_mmap_threshold(threshold_bytes: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Serve every allocation of `threshold_bytes` or more from its own mapping, returned to the OS on free.

    glibc raises its mmap threshold each time such a block is freed (up to 32 MiB); from then on
    batch-sized arrays and tensors come from the heap, which keeps freed space, so an ingest's
    resident memory grew with the number of batches (BENCHMARKS.md, "Ingest cost growth"). Setting
    the threshold turns that adjustment off, process-wide. The ingest flow sets it; the answer flow
    does not, since vLLM generation ran 18 % slower with it (every large tensor becomes an mmap).
    Returns whether it was set: False off Linux/glibc.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other C libraries have no mallopt
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return mallopt(M_MMAP_THRESHOLD, threshold_bytes) == 1
