"""Hand the memory that freed tensors leave in glibc's heaps back to the system.

PyTorch allocates CPU tensors with `malloc`. glibc keeps blocks below its mmap threshold (which it raises up to
32 MiB as larger blocks are freed) in heaps that stay resident after the tensors are freed, so the memory of a
finished training run stays with the process. `trim` returns the heaps' free pages now; it does nothing where the C
library is not glibc. (Lowering the mmap threshold instead, so that every block is unmapped when freed, kept the
demo's resident memory lower between steps but did not lower its peak, and cost much CPU in page faults:
benchmarks/README.md#the-demo-and-its-training-step-step_profilepy.)
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    libc = ctypes.CDLL(name)
    return libc if hasattr(libc, "malloc_trim") else None


def trim() -> bool:
    """Give the free pages of every heap back to the system (glibc's `malloc_trim(0)`); False without glibc."""
    libc = _glibc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True
