"""`vaepar decode --strategy tiled` equals diffusers' own tiled decode bit for bit, on 1-4 workers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from typer.testing import CliRunner

from conftest import reference_decode, save_latents
from vaepar.cli import app

TILE = 32  # pixels: 8 latents at scale 4, stride 6 latents, blend 8 px

# name: (batch, h, w). 19x23 and 17x9 do not divide the grid; 6x7 fits in one tile (decoded
# whole); 12x4 makes only 2 tiles, so 3 and 4 workers leave some idle.
CASES = {"odd": (1, 19, 23), "batch2": (2, 17, 9), "small": (1, 6, 7), "two_tiles": (1, 12, 4)}


def make_inputs(folder: Path, channels: int) -> dict[str, torch.Tensor]:
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(channels)
    zs = {name: torch.randn(b, channels, h, w, generator=g) for name, (b, h, w) in CASES.items()}
    for name, z in zs.items():
        save_latents(folder / f"{name}.safetensors", z)
    return zs


def decode(*args: str) -> None:
    result = CliRunner().invoke(app, ["decode", *args, "--device", "cpu", "--quiet"])
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("nproc", [1, 2, 3, 4])
@pytest.mark.parametrize("model", ["kl4", "kl16", "flux2"])
def test_tiled_decode_is_bit_identical_to_diffusers(
    kl_models: dict[str, Path], flux2_models: dict[str, Path], tmp_path: Path, model: str, nproc: int
) -> None:
    kl_models = {**kl_models, **flux2_models}
    zs = make_inputs(tmp_path / "in", channels=16 if model == "kl16" else 4)
    decode(*(str(tmp_path / "in" / f"{n}.safetensors") for n in zs), "--model", str(kl_models[model]),
           "--out", str(tmp_path / "out"), "--format", "safetensors", "--strategy", "tiled",
           "--tile-size", str(TILE), "--threads", "1", "--raw", "--nproc", str(nproc))
    for name, z in zs.items():
        got = load_file(tmp_path / "out" / f"{name}.safetensors")["sample"]
        want = reference_decode(kl_models[model], z, tile=TILE)
        assert got.shape == want.shape, name
        assert torch.equal(got, want), f"{name}: max diff {(got - want).abs().max().item()}"


def test_default_unscaling_matches_pipeline(kl_models: dict[str, Path], tmp_path: Path) -> None:
    """Without --raw: decode(z / scaling_factor + shift_factor), factors from the model config."""
    z = torch.randn(1, 16, 19, 23, generator=torch.Generator().manual_seed(5))
    src = save_latents(tmp_path / "z.safetensors", z)
    decode(str(src), "--model", str(kl_models["kl16"]), "--out", str(tmp_path / "o.safetensors"),
           "--strategy", "tiled", "--tile-size", str(TILE), "--threads", "1", "--nproc", "2")
    got = load_file(tmp_path / "o.safetensors")["sample"]
    assert torch.equal(got, reference_decode(kl_models["kl16"], z / 0.5 + 0.1159, tile=TILE))


def test_png_output_matches_postprocessed_reference(kl_models: dict[str, Path], tmp_path: Path) -> None:
    z = torch.randn(2, 4, 17, 9, generator=torch.Generator().manual_seed(6))
    src = save_latents(tmp_path / "z.safetensors", z)
    decode(str(src), "--model", str(kl_models["kl4"]), "--out", str(tmp_path / "img.png"),
           "--strategy", "tiled", "--tile-size", str(TILE), "--threads", "1", "--raw")
    want = reference_decode(kl_models["kl4"], z, tile=TILE)
    want = ((want / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255).round().astype(np.int16)
    for b in range(2):
        got = np.asarray(Image.open(tmp_path / f"img_{b}.png").convert("RGB")).astype(np.int16)
        assert got.shape == want[b].shape
        assert np.abs(got - want[b]).max() <= 1


@pytest.mark.parametrize("nproc", [2, 3])
def test_zero_overlap_is_bit_identical_to_diffusers(kl_models: dict[str, Path], tmp_path: Path, nproc: int) -> None:
    """--tile-overlap 0: tiles meet edge to edge, no strips are exchanged, diffusers' result holds."""
    z = torch.randn(1, 4, 19, 23, generator=torch.Generator().manual_seed(7))
    src = save_latents(tmp_path / "z.safetensors", z)
    decode(str(src), "--model", str(kl_models["kl4"]), "--out", str(tmp_path / "o.safetensors"), "--raw",
           "--strategy", "tiled", "--tile-size", str(TILE), "--tile-overlap", "0", "--threads", "1",
           "--nproc", str(nproc))
    got = load_file(tmp_path / "o.safetensors")["sample"]
    want = reference_decode(kl_models["kl4"], z, tile=TILE, overlap=0.0)
    assert torch.equal(got, want), f"max diff {(got - want).abs().max().item()}"
