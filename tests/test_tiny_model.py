"""The `tiny` preset: the VAE vaepar trains and ships (scripts/train_tiny_vae.py, docs/tiny-vae.md),
on real content: a photograph held out from its training."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file
from typer.testing import CliRunner

from vaepar import vae as models
from vaepar.cli import app

PHOTO = models.PACKAGE_DIR / "samples" / "chelsea_256.png"  # held out from training


def cli(*args: str) -> None:
    quiet = [] if args[0] == "bench" else ["--quiet"]
    result = CliRunner().invoke(app, [*args, "--device", "cpu", *quiet])
    assert result.exit_code == 0, result.output


def psnr(a: np.ndarray, b: np.ndarray, peak: float) -> float:
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(peak**2 / mse)


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


@pytest.fixture(scope="module")
def spec() -> models.ModelSpec:
    return models.resolve("tiny")


@pytest.fixture(scope="module")
def latents(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The photo encoded through the CLI, offline, with no --model on decode later."""
    out = tmp_path_factory.mktemp("tiny") / "chelsea.safetensors"
    cli("encode", str(PHOTO), "--model", "tiny", "--out", str(out), "--threads", "1")
    return out


def decode(latents: Path, out: Path, *args: str) -> torch.Tensor:
    cli("decode", str(latents), "--out", str(out), "--threads", "1", *args)
    return load_file(out)["sample"]


def test_tiny_config(spec: models.ModelSpec) -> None:
    assert spec.local and spec.class_name == "AutoencoderKL"
    assert spec.scale == 8 and spec.latent_channels <= 16
    sf = spec.factor("scaling_factor")
    assert sf is not None and sf > 0 and abs(sf - 0.18215) > 1e-4  # measured, not diffusers' default


def test_tiny_weights_are_fp16_and_small(spec: models.ModelSpec) -> None:
    folder = Path(spec.source) / spec.subfolder
    assert sum(f.stat().st_size for f in folder.iterdir() if f.is_file()) <= 8 * 1024 * 1024
    with safe_open(str(folder / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}


def test_png_to_latents_to_png_through_the_cli(latents: Path, tmp_path: Path) -> None:
    with safe_open(str(latents), "pt") as f:
        assert f.metadata()["model"] == "tiny"
        assert f.get_slice("latents").get_shape() == [1, 16, 32, 32]
    cli("decode", str(latents), "--out", str(tmp_path / "back.png"))
    got = psnr(pixels(tmp_path / "back.png"), pixels(PHOTO), 255.0)
    print(f"\ntiny round trip of {PHOTO.name} through the CLI: {got:.2f} dB")
    assert got >= 29.0  # 29.82 dB measured (docs/tiny-vae.md); the previous model gave 27.23 dB


def test_shard_equals_untiled_and_tiled_differs_measurably(latents: Path, tmp_path: Path) -> None:
    untiled = decode(latents, tmp_path / "none.safetensors", "--strategy", "none")
    shard = decode(latents, tmp_path / "shard.safetensors", "--strategy", "shard", "--nproc", "2")
    tiled = decode(latents, tmp_path / "tiled.safetensors", "--strategy", "tiled", "--tile-size", "128")
    scale = max(1.0, untiled.abs().max().item())
    shard_err = (shard - untiled).abs().max().item()
    tiled_err = (tiled - untiled).abs().max().item()
    print(f"\ntiny, {PHOTO.name}: max |shard - untiled| {shard_err:.2e}; tiled (128 px tiles) vs untiled: "
          f"max |diff| {tiled_err:.3f}, PSNR {psnr(tiled, untiled, 2.0):.2f} dB (range [-1, 1])")
    assert shard_err <= 1e-4 * scale
    assert tiled_err > 1e-3  # tiles see less context: a real, visible difference...
    assert psnr(tiled, untiled, 2.0) >= 40.0  # ...that the blend keeps small (46.4 dB measured)


def test_round_trip_on_a_held_out_photo_from_outside_skimage(spec: models.ModelSpec) -> None:
    """matplotlib's grace_hopper.jpg, never trained on (scripts/train_tiny_vae.py HELD_OUT): encode ->
    mode -> decode, untiled, float32, uint8 PSNR, as the training script's --eval-only measures it."""
    from diffusers import AutoencoderKL
    from matplotlib import cbook

    from vaepar.outputs import to_uint8

    with cbook.get_sample_data("grace_hopper.jpg") as f:
        img = np.array(Image.open(f).convert("RGB"))
    top, left = (img.shape[0] - 256) // 2, (img.shape[1] - 256) // 2
    img = img[top:top + 256, left:left + 256]
    vae = AutoencoderKL.from_pretrained(Path(spec.source) / spec.subfolder, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        x = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 127.5 - 1
        y = to_uint8(vae.decode(vae.encode(x).latent_dist.mode()).sample)[0]
    got = psnr(y, img, 255.0)
    print(f"\ntiny round trip of grace_hopper.jpg, centre 256: {got:.2f} dB")
    assert got >= 27.0  # 27.87 dB measured; the previous model gave 24.30 dB


def test_bench_runs_offline_on_tiny(tmp_path: Path) -> None:
    cli("bench", "--model", "tiny", "--resolution", "128", "--nproc", "1", "--strategies", "none,tiled",
        "--tile-size", "64", "--repeats", "1", "--warmup", "0", "--json", str(tmp_path / "b.json"))
    doc = json.loads((tmp_path / "b.json").read_text())
    assert doc["model"] == "tiny" and doc["latent_shape"] == [1, 16, 16, 16]
    assert {r["strategy"] for r in doc["runs"]} == {"none", "tiled"}
