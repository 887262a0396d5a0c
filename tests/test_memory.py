"""tasks/memory.py: the fixed mmap threshold really changes where glibc serves a freed-then-reallocated size."""

import os
import subprocess
import sys

import pytest

PROBE = """
import ctypes, sys
sys.path.insert(0, {root!r})
from tasks.memory import fix_mmap_threshold

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
block = bytearray(8 * 2**20)   # mapped on its own; freeing it raises glibc's threshold to 8 MiB
del block
if {fix}:
    assert fix_mmap_threshold()
before = libc.mallinfo2().hblks
batch = bytearray(512 * 2**10)  # a batch-sized block
print(libc.mallinfo2().hblks - before)
"""


def mapped_blocks_for_batch(fix: bool) -> int:
    """The probe in a process with glibc's default malloc settings: any of them set in the environment
    (a user's, or Dask's for its workers) turns its dynamic threshold off."""
    from pathlib import Path

    root = str(Path(__file__).resolve().parent.parent)
    env = {name: value for name, value in os.environ.items() if not name.startswith(("MALLOC_", "GLIBC_TUNABLES"))}
    out = subprocess.run([sys.executable, "-c", PROBE.format(root=root, fix=fix)], capture_output=True, text=True,
                         check=True, env=env)
    return int(out.stdout.strip())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_fixed_threshold_maps_batch_sized_blocks_that_glibc_would_keep_on_the_heap():
    assert mapped_blocks_for_batch(fix=False) == 0  # glibc's own behaviour after a large free: heap
    assert mapped_blocks_for_batch(fix=True) == 1  # fixed threshold: its own mapping, freed to the OS
