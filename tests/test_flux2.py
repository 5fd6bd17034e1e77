"""FLUX.2 (``AutoencoderKLFlux2``): latents as ``Flux2Pipeline`` hands them over (2x2-patch tokens
normalised with the VAE's BatchNorm statistics), untiled decode and encode equal to diffusers, the
CLI end to end. Tiled and shard exactness are in test_decode_exact, test_encode and test_shard."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from conftest import save_latents, single_thread
from vaepar.cli import app


def cli(*args: str, code: int = 0) -> str:
    result = CliRunner().invoke(app, [*args, "--device", "cpu", "--quiet", "--threads", "1"])
    assert result.exit_code == code, result.output
    return result.output


def load(model: Path):  # noqa: ANN201 - a diffusers AutoencoderKLFlux2
    from diffusers import AutoencoderKLFlux2

    return AutoencoderKLFlux2.from_pretrained(model).eval()


# Flux2Pipeline's own latent layout, written out as its methods do it (the pipeline module needs
# transformers, which this project does not install).
def patchify(z: torch.Tensor) -> torch.Tensor:
    b, c, h, w = z.shape
    return z.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, c * 4, h // 2, w // 2)


def unpatchify(z: torch.Tensor) -> torch.Tensor:
    b, c, h, w = z.shape
    return z.reshape(b, c // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, c // 4, h * 2, w * 2)


def pack(z: torch.Tensor) -> torch.Tensor:
    b, c, h, w = z.shape
    return z.reshape(b, c, h * w).permute(0, 2, 1)


def bn_stats(vae) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: ANN001
    mean = vae.bn.running_mean.view(1, -1, 1, 1)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps)
    return mean, std


@pytest.fixture(scope="module")
def model(flux2_models: dict[str, Path]) -> Path:
    return flux2_models["flux2"]


def test_pipeline_tokens_decode_as_the_pipeline_does(model: Path, tmp_path: Path) -> None:
    """Packed, normalised tokens (B, (H/16)(W/16), 4C) with height/width in the metadata: vaepar
    unpacks and un-normalises exactly as Flux2Pipeline (unpack, * std + mean, unpatchify)."""
    vae = load(model)
    tokens = torch.randn(2, 3 * 5, 16, generator=torch.Generator().manual_seed(1))  # 24x40 pixels (scale 4)
    src = save_latents(tmp_path / "t.safetensors", tokens, height="24", width="40")
    cli("decode", str(src), "--model", str(model), "--out", str(tmp_path / "o.safetensors"), "--strategy", "none")
    mean, std = bn_stats(vae)
    patched = tokens.permute(0, 2, 1).reshape(2, 16, 3, 5)
    with single_thread(), torch.no_grad():
        want = vae.decode(unpatchify(patched * std + mean)).sample
    assert torch.equal(load_file(tmp_path / "o.safetensors")["sample"], want)


def test_encode_writes_the_pipeline_normalisation_and_round_trips(model: Path, tmp_path: Path) -> None:
    vae = load(model)
    rng = np.random.default_rng(3)
    Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(tmp_path / "img.png")
    cli("encode", str(tmp_path / "img.png"), "--model", str(model), "--out", str(tmp_path / "z.safetensors"),
        "--strategy", "none")
    got = load_file(tmp_path / "z.safetensors")["latents"]
    x = torch.from_numpy(np.array(Image.open(tmp_path / "img.png"))).permute(2, 0, 1)[None].float() / 127.5 - 1
    mean, std = bn_stats(vae)
    with single_thread(), torch.no_grad():
        mode = vae.encode(x).latent_dist.mode()
    assert torch.equal(got, unpatchify((patchify(mode) - mean) / std))  # Flux2Pipeline's image latents
    cli("decode", str(tmp_path / "z.safetensors"), "--out", str(tmp_path / "back.png"))
    assert Image.open(tmp_path / "back.png").size == (56, 40)
    cli("decode", str(tmp_path / "z.safetensors"), "--out", str(tmp_path / "back.safetensors"), "--strategy", "none")
    with single_thread(), torch.no_grad():
        want = vae.decode(mode).sample
    assert (load_file(tmp_path / "back.safetensors")["sample"] - want).abs().max() < 1e-5  # normalised and back


def test_untiled_decode_and_encode_equal_diffusers(model: Path, tmp_path: Path) -> None:
    vae = load(model)
    z = torch.randn(1, 4, 9, 7, generator=torch.Generator().manual_seed(4))
    src = save_latents(tmp_path / "z.safetensors", z)
    cli("decode", str(src), "--model", str(model), "--out", str(tmp_path / "o.safetensors"), "--raw",
        "--strategy", "none")
    x = torch.rand(1, 3, 36, 28, generator=torch.Generator().manual_seed(5)) * 2 - 1
    save_file({"sample": x}, str(tmp_path / "x.safetensors"))
    cli("encode", str(tmp_path / "x.safetensors"), "--model", str(model), "--out", str(tmp_path / "e.safetensors"),
        "--raw", "--strategy", "none")
    with single_thread(), torch.no_grad():
        assert torch.equal(load_file(tmp_path / "o.safetensors")["sample"], vae.decode(z).sample)
        assert torch.equal(load_file(tmp_path / "e.safetensors")["latents"], vae.encode(x).latent_dist.mode())


def test_scalar_factors_are_refused(model: Path, tmp_path: Path) -> None:
    src = save_latents(tmp_path / "z.safetensors", torch.randn(1, 4, 4, 4))
    out = cli("decode", str(src), "--model", str(model), "--out", str(tmp_path / "o.png"), "--scaling-factor", "0.3",
              code=2)
    assert "BatchNorm statistics" in out and "Traceback" not in out
