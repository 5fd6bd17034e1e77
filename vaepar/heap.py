"""Freed heap memory handed back to the OS (glibc's ``malloc_trim``), for CPU peaks that follow
live tensors rather than the allocator's history."""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable


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
