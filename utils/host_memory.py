"""Keep freed host memory in the process instead of handing it back to the kernel after every tensor.

glibc's malloc serves large blocks with a fresh `mmap` (above `M_MMAP_THRESHOLD`, 128 KiB at start,
raised dynamically as blocks are freed) and returns the free top of the heap to the kernel (above
`M_TRIM_THRESHOLD`). A CPU training step allocates and frees the same activation tensors every step,
so by default each step page-faults its working set in again: ~6,800 minor faults per step of the
shapes domain's base stage (batch 32), 0 once freed memory is kept (measured with
`getrusage().ru_minflt`). On a loaded or virtualised machine a fault can cost far more than the
arithmetic that follows it; see README "Training speed". Results do not change: only where tensors
live. PyTorch's CPU performance guide gives the same advice (jemalloc / tcmalloc).
"""

from __future__ import annotations

import ctypes
import logging
import platform

logger = logging.getLogger(__name__)

# mallopt parameters (glibc malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# The largest mmap threshold glibc accepts on 64-bit (HEAP_MAX_SIZE / 2); bigger blocks stay mmap'ed.
MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = (1 << 31) - 1  # mallopt takes an int: keep up to 2 GiB of free heap


def keep_freed_host_memory() -> bool:
    """Raise glibc's mmap and trim thresholds for this process (no-op elsewhere). Returns whether set.

    Call it early, before the large allocations: memory mapped before the call is not affected.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    ok = libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
    ok = libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1 and ok
    if not ok:
        logger.warning("mallopt refused the mmap/trim thresholds; host memory is returned as usual")
    return ok
