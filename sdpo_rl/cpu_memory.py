"""glibc allocator settings for training on CPU, so that memory a training step frees goes back to the system.

PyTorch allocates CPU tensors with `malloc`. glibc serves blocks below its mmap threshold from heaps ("arenas", up to
eight per core) that keep freed memory for reuse, and it raises that threshold, up to 32 MiB, each time a larger
block is freed. A training step's activations and temporary tensors (a few MiB to tens of MiB each, freed in a
different order than allocated) then come from heaps that stay fragmented and resident, so the process's resident
memory grows well past what its live tensors need. `return_freed_memory` fixes the threshold low, so that those
blocks are mapped and unmapped one by one, and limits the arenas; `trim` hands the heaps' free pages back now.
Both do nothing where the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

# mallopt parameters, from glibc's malloc.h
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    libc = ctypes.CDLL(name)
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


def return_freed_memory(mmap_threshold: int = 1 << 20, arena_max: int = 2) -> bool:
    """Blocks of `mmap_threshold` bytes or more are unmapped when freed; at most `arena_max` heaps.

    Call it early, before the large allocations. Returns whether the settings were applied (glibc only).
    """
    libc = _glibc()
    if libc is None:
        return False
    return all(
        libc.mallopt(parameter, value) == 1
        for parameter, value in (
            (_M_MMAP_THRESHOLD, mmap_threshold),
            (_M_TRIM_THRESHOLD, 2 * mmap_threshold),
            (_M_ARENA_MAX, arena_max),
        )
    )


def trim() -> None:
    """Give the free pages of every heap back to the system (glibc's `malloc_trim(0)`)."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)
