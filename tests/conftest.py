"""Tiny random VAEs saved as diffusers folders, and helpers shared by the tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

KL_VARIANTS = {
    # name: (latent channels, use_post_quant_conv, shift_factor)
    "kl4": (4, True, None),
    "kl16": (16, False, 0.1159),
}


def make_kl(path: Path, channels: int = 4, post_quant: bool = True, shift: float | None = None,
            sample_size: int = 32, blocks: tuple[int, ...] = (16, 32, 32)) -> Path:
    """A random AutoencoderKL (scale 2**(len(blocks)-1)) saved with save_pretrained."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=blocks, down_block_types=("DownEncoderBlock2D",) * len(blocks),
        up_block_types=("UpDecoderBlock2D",) * len(blocks), latent_channels=channels,
        norm_num_groups=8, sample_size=sample_size, layers_per_block=1,
        use_quant_conv=post_quant, use_post_quant_conv=post_quant,
        scaling_factor=0.5, shift_factor=shift,
    )
    vae.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def kl_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {name: make_kl(root / name, c, pq, sh) for name, (c, pq, sh) in KL_VARIANTS.items()}


def save_latents(path: Path, z: torch.Tensor, **metadata: str) -> Path:
    save_file({"latents": z.contiguous()}, str(path), metadata=metadata or None)
    return path


def reference_decode(model_dir: Path, z: torch.Tensor, *, tile: int | None, overlap: float = 0.25) -> torch.Tensor:
    """diffusers' own decode (tiled with the given attributes), single-threaded."""
    from diffusers import AutoencoderKL

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        vae = AutoencoderKL.from_pretrained(model_dir).eval()
        if tile is not None:
            vae.enable_tiling()
            vae.tile_sample_min_size = tile
            vae.tile_latent_min_size = tile // (2 ** (len(vae.config.block_out_channels) - 1))
            vae.tile_overlap_factor = overlap
        with torch.no_grad():
            return vae.decode(z).sample
    finally:
        torch.set_num_threads(threads)
