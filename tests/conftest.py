"""Tiny random VAEs saved as diffusers folders, and helpers shared by the tests."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import diffusers
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


HAS_LTX2 = hasattr(diffusers, "AutoencoderKLLTX2Video")  # not in diffusers 0.36
NEEDS_LTX2 = pytest.mark.skipif(not HAS_LTX2, reason="this diffusers release has no AutoencoderKLLTX2Video")


def with_ltx2(*values: object) -> object:
    """A parametrize value, skipped where diffusers has no LTX-2 class and the value names it."""
    return pytest.param(*values, marks=NEEDS_LTX2) if "ltx2" in values else (values[0] if len(values) == 1 else values)


def make_qwen(path: Path) -> Path:
    """A random AutoencoderKLQwenImage (Wan 2.1's design on one frame): 8x, 4 latent channels, with
    per-channel latents_mean/latents_std that its pipelines (un)scale with."""
    from diffusers import AutoencoderKLQwenImage

    torch.manual_seed(3)
    AutoencoderKLQwenImage(base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True], latents_mean=WAN_MEAN,
                           latents_std=WAN_STD).save_pretrained(path)
    return path


def make_hv15(path: Path) -> Path:
    """A random AutoencoderKLHunyuanVideo15: 16x in space, 4x in time, 4 latent channels."""
    from diffusers import AutoencoderKLHunyuanVideo15

    torch.manual_seed(4)
    AutoencoderKLHunyuanVideo15(latent_channels=4, block_out_channels=(8, 16, 16, 32, 32), layers_per_block=1,
                                scaling_factor=0.7).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def family_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The families added after KL and Wan: Qwen-Image, HunyuanVideo 1.5 and LTX-2."""
    root = tmp_path_factory.mktemp("families")
    models = {"qwen": make_qwen(root / "qwen"), "hv15": make_hv15(root / "hv15")}
    return models | ({"ltx2": make_ltx2(root / "ltx2")} if HAS_LTX2 else {})


def enable_tiling(vae: torch.nn.Module, tile: int, overlap: float = 0.25) -> None:
    """diffusers' tiling attributes of ``vae``'s class set as vaepar maps ``--tile-size``/``--tile-overlap``."""
    name = type(vae).__name__
    if name in ("AutoencoderKL", "AutoencoderKLFlux2"):
        vae.enable_tiling()
        vae.tile_sample_min_size = tile
        vae.tile_latent_min_size = tile // 2 ** (len(vae.config.block_out_channels) - 1)
        vae.tile_overlap_factor = overlap
    elif name == "AutoencoderKLHunyuanVideo15":
        lat = tile // vae.spatial_compression_ratio
        vae.enable_tiling(tile, tile, lat, lat, overlap)
    else:  # Wan, Qwen-Image: tile and stride in pixels
        stride = int(tile * (1 - overlap))
        vae.enable_tiling(tile_sample_min_height=tile, tile_sample_min_width=tile,
                          tile_sample_stride_height=stride, tile_sample_stride_width=stride)


def reference(model_dir: Path, task: str, x: torch.Tensor, *, tile: int | None = None,
              overlap: float = 0.25) -> torch.Tensor:
    """diffusers' own ``vae.decode(z).sample`` or ``vae.encode(x).latent_dist.mode()`` (tiled as vaepar
    maps ``tile``/``overlap``), single-threaded, one sample per call where the class needs it; image tensors of a class that works on frames get
    their one-frame axis around the call."""
    with single_thread():
        vae = vae_class(model_dir).from_pretrained(model_dir).eval()
        if tile is not None:
            enable_tiling(vae, tile, overlap)
        if type(vae).__name__ == "AutoencoderKLHunyuanVideo15":
            vae.enable_slicing()  # its attention mask fails on batches > 1 otherwise
        frame = x.ndim == 4 and type(vae).__name__ == "AutoencoderKLQwenImage"
        x = x.unsqueeze(2) if frame else x
        with torch.no_grad():
            out = vae.decode(x).sample if task == "decode" else vae.encode(x).latent_dist.mode()
        return out.squeeze(2) if frame else out


def make_ltx2(path: Path) -> Path:
    """A random AutoencoderKLLTX2Video: 32x in space (4x4 patches, three 2x stages), 8x in time,
    8 latent channels, a non-causal decoder that pads by reflection, no noise injection."""
    from diffusers import AutoencoderKLLTX2Video

    torch.manual_seed(5)
    AutoencoderKLLTX2Video(latent_channels=8, block_out_channels=(8, 16, 32, 32), decoder_block_out_channels=(8, 16, 32),
                           layers_per_block=(1, 1, 1, 1, 1), decoder_layers_per_block=(1, 1, 1, 1),
                           decoder_inject_noise=(False,) * 4, patch_size=4, spatial_compression_ratio=32,
                           temporal_compression_ratio=8, decoder_causal=False).save_pretrained(path)
    return path
