"""Peak-memory measurement on CPU."""

from __future__ import annotations

import pytest
import torch

from vaepar import heap
from vaepar.report import MemoryMeter, _status_bytes

MB = 1 << 20


def test_cpu_peak_counts_memory_the_allocator_reuses() -> None:
    # Leave freed memory inside the heap, as a previous job does: freeing a 16 MB block raises glibc's
    # mmap threshold, so 1 MB blocks then come from the heap; a live block on top keeps it from shrinking.
    big = torch.ones(16 * MB // 4)
    del big
    blocks = [torch.ones(MB // 4) for _ in range(40)]
    pin = torch.ones(MB // 4)
    del blocks
    meter = MemoryMeter(torch.device("cpu"))
    meter.start()
    x = torch.ones(8 * MB // 4)
    peak = meter.peak()
    assert x.sum() == 2 * MB and pin.sum() == MB // 4
    assert 7 * MB <= peak <= 32 * MB, peak


@pytest.mark.skipif(heap._malloc_trim() is None, reason="the C library is not glibc")
def test_trim_returns_freed_heap_pages_that_free_keeps() -> None:
    big = torch.ones(16 * MB // 4)  # raises glibc's mmap threshold: 1 MB blocks then come from the heap
    del big
    blocks = [torch.ones(MB // 4) for _ in range(64)]
    pin = torch.ones(MB // 4)  # on top of them, so that free() cannot shrink the heap
    del blocks
    kept = _status_bytes("VmRSS")
    heap.trim()
    assert kept - _status_bytes("VmRSS") >= 48 * MB
    assert pin.sum() == MB // 4
