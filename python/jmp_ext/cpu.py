"""Process settings for running on the CPU."""

from __future__ import annotations

import ctypes
import ctypes.util

# mallopt parameters (glibc malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4


_freed_memory_kept = False


def freed_memory_is_kept() -> bool:
    """Whether keep_freed_memory() is in effect: the CPU radius graph then reuses recycled heap
    and does not ask for huge pages for its fresh buffers (csrc/common/huge_pages.h)."""
    return _freed_memory_kept


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse instead of handing it back to the kernel.

    A training step allocates and frees the same few GB of large tensors every step. By default
    glibc serves each block above its mmap threshold (32 MB at most) with a fresh mmap and returns
    a freed heap top to the kernel, so every step page-faults its memory in again. On the 2-core
    VM of bench/README.md a 32-slab step of the small model took 17.3 s; with mmap and trimming
    off, the same code took 10.2 s from the third step on. The cost: the process
    keeps its peak memory until it exits. Returns False (and changes nothing) where the C library
    is not glibc."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    # -1 reaches glibc as SIZE_MAX: never trim.
    global _freed_memory_kept
    _freed_memory_kept = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, -1))
    return _freed_memory_kept
