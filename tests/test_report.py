"""Peak-memory measurement and the allocator settings on CPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vaepar import heap
from vaepar.report import MemoryMeter, _status_bytes

from conftest import make_kl

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


WATCH_TORCH_IMPORT = """
import os, sys
seen = []
class Watch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" and not seen:
            seen.append(os.environ.get("THP_MEM_ALLOC_ENABLE"))
sys.meta_path.insert(0, Watch())
import vaepar.cli
print(seen[0])
"""


@pytest.mark.parametrize(("given", "seen"), [(None, "1"), ("0", "0")])
def test_the_cli_asks_for_huge_pages_before_torch_is_imported(given: str | None, seen: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    if given is not None:
        env["THP_MEM_ALLOC_ENABLE"] = given  # the user's own setting stands
    out = subprocess.run([sys.executable, "-c", WATCH_TORCH_IMPORT], env=env, capture_output=True, text=True,
                         check=True)
    assert out.stdout.split() == [seen]


DECODE = """
import resource, sys, torch
from diffusers import AutoencoderKL
from safetensors.torch import save_file
torch.set_num_threads(1)
vae = AutoencoderKL.from_pretrained(sys.argv[1]).eval()
z = torch.randn(1, 4, 128, 128, generator=torch.Generator().manual_seed(0))
with torch.inference_mode():
    x = vae.decode(z).sample
save_file({"x": x.contiguous()}, sys.argv[2])
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
torch.empty(16 << 20).fill_(1.0)  # a fresh 64 MiB tensor, touched once: how this process faults in pages
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _thp_mode() -> str:
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return "never"
    return text[text.index("[") + 1 : text.index("]")]


@pytest.mark.skipif(_thp_mode() != "madvise",
                    reason="only where the kernel's THP mode is madvise does the switch decide the page size")
def test_huge_pages_change_page_faults_not_results(tmp_path: Path) -> None:
    model = make_kl(tmp_path / "kl")  # 16 channels at 512x512 pixels: 16 MiB activations, above torch's 2 MiB
    faults, outputs = {}, {}
    for thp in ("0", "1"):
        out = tmp_path / f"x{thp}.safetensors"
        env = {**os.environ, "THP_MEM_ALLOC_ENABLE": thp, "OMP_NUM_THREADS": "1"}
        run = subprocess.run([sys.executable, "-c", DECODE, str(model), str(out)], env=env, capture_output=True,
                             text=True, check=True)
        faults[thp], outputs[thp] = int(run.stdout.split()[-1]), load_file(out)["x"]
    assert outputs["1"].shape == (1, 3, 512, 512)
    assert torch.equal(outputs["0"], outputs["1"])
    assert faults["0"] >= 16384 and faults["1"] < faults["0"] / 4, faults  # 4 KiB pages without the switch
