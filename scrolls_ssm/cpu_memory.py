"""Keep freed memory in the process on Linux CPUs, so that each training step does not page-fault its tensors anew.

With glibc's default policy, every allocation above its mmap threshold (at most 32 MiB) gets fresh pages from the
kernel and gives them back when freed, and the heap is trimmed whenever enough of its top is free. At 16K tokens
most activations are tens of MiB, so every forward + backward step first-touches gigabytes of new pages: page faults
and zeroing that measured about half of a Mamba-2 or LED encoder's 16K step on the 2-core development machine
(docs/benchmarks.md, "The allocator"). `retain_freed_memory` tells malloc to serve every request from its heap and
never hand memory back: after the first step or two, a step reuses the pages of the ones before. The cost is that the
process keeps its peak (and some fragmentation: peaks measured up to 1.4x higher), which a training job reaches
every step anyway.

It is a process-wide setting, so the training loop applies it (`train.retain_freed_memory`, on by default, CPU runs
only) and a library import never does.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

# mallopt(3) parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4


def retain_freed_memory() -> bool:
    """Asks glibc's malloc to keep freed memory for reuse: no mmap for large requests, no trimming of the heap.

    Returns True when both settings took effect, False where they cannot (not Linux, not glibc, or refused); the
    process is then left as it was. Safe to call more than once."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other libcs have no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # mallopt(3): M_MMAP_MAX 0 "disables the use of mmap(2) for servicing large allocation requests"; M_TRIM_THRESHOLD
    # -1 "disables trimming completely". Each returns 1 on success.
    return mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, -1) == 1
