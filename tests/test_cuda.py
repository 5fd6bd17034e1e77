"""The multi-rank CUDA path, run whenever a GPU is present (skipped on CPU-only machines): 2 and 4
ranks sharing one GPU through ``--backend gloo`` (transfers staged through host memory), so device
placement, dtypes, halo exchange and the CUDA memory meter run with several ranks on one device."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from conftest import reference_decode, save_latents
from vaepar import cli

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@pytest.mark.parametrize("strategy", ["shard", "tiled"])
@pytest.mark.parametrize("nproc", [2, 4])
def test_ranks_sharing_one_gpu(tmp_path: Path, kl_models: dict[str, Path], nproc: int, strategy: str) -> None:
    model = kl_models["kl4"]
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    src = save_latents(tmp_path / "z.safetensors", z)
    out, doc = tmp_path / "out.safetensors", tmp_path / "report.json"
    tile = ["--tile-size", "32"] if strategy == "tiled" else []
    result = CliRunner().invoke(cli.app, [
        "decode", str(src), "--out", str(out), "--model", str(model), "--gpus", str(nproc), "--backend", "gloo",
        "--strategy", strategy, *tile, "--dtype", "float32", "--raw", "--quiet", "--json", str(doc)])
    assert result.exit_code == 0, result.output
    got = load_file(out)["sample"]
    want = reference_decode(model, z, tile=32 if strategy == "tiled" else None)
    # CUDA convolutions may use TF32: a looser bound than the CPU tests' 1e-4
    assert (got - want).abs().max().item() <= 2e-2 * max(1.0, want.abs().max().item())
    ranks = json.loads(doc.read_text())["jobs"][0]["ranks"]
    assert len(ranks) == nproc
    assert {r["device"] for r in ranks} == {"cuda:0"}
    assert all(r["peak_mem_bytes"] > 0 for r in ranks)
