"""Tiny random VAEs saved as diffusers folders, and helpers shared by the tests."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
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


def make_flux2(path: Path) -> Path:
    """A random AutoencoderKLFlux2 (scale 4, 4 latent channels, 16 patch channels) with random
    BatchNorm statistics, so that its pipelines' (un)scaling is visible."""
    from diffusers import AutoencoderKLFlux2

    torch.manual_seed(2)
    vae = AutoencoderKLFlux2(
        block_out_channels=(16, 32, 32), down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3, latent_channels=4, norm_num_groups=8, sample_size=32,
        layers_per_block=1,
    )
    vae.bn.running_mean.copy_(torch.randn(16) * 0.3)
    vae.bn.running_var.copy_(torch.rand(16) + 0.5)
    vae.save_pretrained(path)
    return path


def vae_class(model_dir: Path) -> type:
    """The diffusers class a saved VAE names in its config."""
    import json

    import diffusers

    return getattr(diffusers, json.loads((model_dir / "config.json").read_text())["_class_name"])


@pytest.fixture(scope="session")
def flux2_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return {"flux2": make_flux2(tmp_path_factory.mktemp("flux2") / "flux2")}


@pytest.fixture(scope="session")
def kl_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {name: make_kl(root / name, c, pq, sh) for name, (c, pq, sh) in KL_VARIANTS.items()}


def save_latents(path: Path, z: torch.Tensor, **metadata: str) -> Path:
    save_file({"latents": z.contiguous()}, str(path), metadata=metadata or None)
    return path


def reference_decode(model_dir: Path, z: torch.Tensor, *, tile: int | None, overlap: float = 0.25) -> torch.Tensor:
    """diffusers' own decode (tiled with the given attributes), single-threaded."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        vae = vae_class(model_dir).from_pretrained(model_dir).eval()
        if tile is not None:
            vae.enable_tiling()
            vae.tile_sample_min_size = tile
            vae.tile_latent_min_size = tile // (2 ** (len(vae.config.block_out_channels) - 1))
            vae.tile_overlap_factor = overlap
        with torch.no_grad():
            return vae.decode(z).sample
    finally:
        torch.set_num_threads(threads)


# -- Wan (video) ------------------------------------------------------------------------------

WAN_MEAN = [0.1, -0.2, 0.3, -0.4]  # per-channel latent factors of the tiny Wan models (z_dim 4)
WAN_STD = [1.5, 0.5, 2.0, 1.2]
# name: spatial compression (scale_factor_spatial): Wan 2.1 decodes 8x; Wan 2.2 decodes 8x into
# 2x2-patchified channels, then unpatchifies: 16x.
WAN_VARIANTS = {"wan21": 8, "wan22": 16}


def make_wan(path: Path, version: str) -> Path:
    """A random AutoencoderKLWan saved with save_pretrained: 4 latent channels, 4x in time.

    Four levels (dim_mult of length 4) give three 2x spatial upsamplings, two of them also
    temporal, as the real models; ``wan22`` adds Wan 2.2's residual blocks, 2x2 patches (12
    decoder channels) and a decoder wider than its encoder.
    """
    from diffusers import AutoencoderKLWan

    torch.manual_seed(1)
    common = dict(base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                  temperal_downsample=[False, True, True], latents_mean=WAN_MEAN, latents_std=WAN_STD)
    if version == "wan21":
        vae = AutoencoderKLWan(**common, scale_factor_spatial=8)
    elif version == "wan22":
        vae = AutoencoderKLWan(**common, decoder_base_dim=16, is_residual=True, patch_size=2,
                               in_channels=12, out_channels=12, scale_factor_spatial=16)
    else:
        raise ValueError(version)
    vae.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def wan_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("wan")
    return {name: make_wan(root / name, name) for name in WAN_VARIANTS}


def reference_wan_decode(model_dir: Path, z: torch.Tensor, *, tile: int | None,
                         overlap: float = 0.25) -> torch.Tensor:
    """diffusers' AutoencoderKLWan decode (tiled with tile/stride from ``tile``), single-threaded."""
    from diffusers import AutoencoderKLWan

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        vae = AutoencoderKLWan.from_pretrained(model_dir).eval()
        if tile is not None:
            stride = int(tile * (1 - overlap))
            vae.enable_tiling(tile_sample_min_height=tile, tile_sample_min_width=tile,
                              tile_sample_stride_height=stride, tile_sample_stride_width=stride)
        with torch.no_grad():
            return vae.decode(z).sample
    finally:
        torch.set_num_threads(threads)


@contextmanager
def single_thread() -> Iterator[None]:
    """One intra-op thread, as vaepar's workers use in the exactness tests."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
