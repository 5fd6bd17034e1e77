"""CPU memory: freed heap handed back to the OS (glibc's ``malloc_trim``), for peaks that follow
live tensors rather than the allocator's history, and huge pages for torch's large tensors."""

from __future__ import annotations

import ctypes
import functools
import os
from collections.abc import Callable

TORCH_ENV = {"THP_MEM_ALLOC_ENABLE": "1"}
"""What vaepar's processes tell PyTorch before importing it: allocate CPU tensors of 2 MiB and more
on transparent huge pages (PyTorch's own switch; it acts where the kernel's THP mode is ``madvise``
or ``always``). A decoder's fresh full-resolution buffers then fault in 2 MiB at a time, not 4 KiB:
on SD's 256² tiles ~40-70 thousand page faults instead of ~500 thousand, 2-5 % of a CPU tile's time
(docs/benchmarks.md). Where tensors live does not change what is computed: results are identical."""


def use_huge_pages() -> None:
    """Set :data:`TORCH_ENV` for this process and the workers it starts, where the user has not
    set it. Only effective before torch is imported (PyTorch reads it once)."""
    for key, value in TORCH_ENV.items():
        os.environ.setdefault(key, value)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


def trim() -> None:
    """Return the heap's free pages to the OS; nothing where the C library is not glibc.

    glibc keeps freed chunks (below its mmap threshold, which grows to 32 MiB) resident for reuse;
    a later phase that allocates only larger, mmapped buffers then holds both. Tensor data stays
    where it is: only whole free pages are released, so results do not change.
    """
    fn = _malloc_trim()
    if fn is not None:
        fn(0)
