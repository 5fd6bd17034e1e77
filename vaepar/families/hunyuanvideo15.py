"""``AutoencoderKLHunyuanVideo15``: HunyuanVideo 1.5 (video, 16x spatial and 4x temporal
compression, 32 latent channels).

Unlike Wan, the class decodes and encodes the whole clip in one call (no time cache): its causal
3-D convolutions pad themselves with replicated edges, and its attention runs over all frames x
rows x columns with a frame-causal mask. Tiling is AutoencoderKL's (``tile_overlap_factor``, a blend
as wide as the overlap, no crop), with ``tile_latent_min_*`` set apart from ``tile_sample_min_*``:
vaepar sets both from ``--tile-size``. Pipelines divide latents by ``scaling_factor`` before decode.

Its attention mask is built for one sample (diffusers fails on batches unless ``use_slicing`` is on),
so vaepar runs one sample per call, as ``use_slicing`` does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from vaepar.errors import OptionError
from vaepar.families.base import ShardLeaves, Tick, no_tick
from vaepar.families.kl import KLFamily

if TYPE_CHECKING:
    from vaepar.vae import ModelSpec

TILE = 256  # diffusers' tile_sample_min_height/width for this class


class HunyuanVideo15Family(KLFamily):
    classes = ("AutoencoderKLHunyuanVideo15",)
    video = True
    scaling_rule = "z / scaling_factor"
    decode_returns_tensor = True

    @classmethod
    def latent_channels(cls, config: dict[str, Any]) -> int:
        return int(config.get("latent_channels", 32))

    @classmethod
    def scale(cls, config: dict[str, Any]) -> int:
        return int(config.get("spatial_compression_ratio", 16))

    @classmethod
    def temporal(cls, config: dict[str, Any]) -> int:
        return int(config.get("temporal_compression_ratio", 4))

    @classmethod
    def default_tile(cls, config: dict[str, Any]) -> int:
        return TILE

    @classmethod
    def own_tiling(cls, vae: torch.nn.Module, spec: ModelSpec) -> tuple[int, float]:
        size, lat = vae.tile_sample_min_height, vae.tile_latent_min_height
        if (size, lat) != (vae.tile_sample_min_width, vae.tile_latent_min_width) or lat != size // spec.scale:
            raise OptionError("vaepar's tiled strategy needs square tiles with tile_latent_min_height/width = "
                              "tile_sample_min_height/width // scale")
        return size, vae.tile_overlap_factor

    def fresh_activations(self) -> list[torch.nn.Module]:
        """None: this class's activations run as diffusers wrote them (not audited for reuse)."""
        return []

    @classmethod
    def upsampler_types(cls) -> tuple[type, ...]:
        from diffusers.models.autoencoders.autoencoder_kl_hunyuanvideo15 import HunyuanVideo15Upsample

        return (HunyuanVideo15Upsample,)

    @classmethod
    def shard_leaves(cls) -> ShardLeaves:
        from diffusers.models.autoencoders.autoencoder_kl_hunyuanvideo15 import (
            HunyuanVideo15AttnBlock,
            HunyuanVideo15CausalConv3d,
        )

        return ShardLeaves(causal_attention=(HunyuanVideo15AttnBlock,), padded_convs=(HunyuanVideo15CausalConv3d,))

    def decode_tile(self, z: torch.Tensor, *, tiled: bool, tick: Tick = no_tick) -> torch.Tensor:
        out = _per_sample(self.vae.decoder, z)
        tick(1)
        return out

    def encode_tile(self, x: torch.Tensor, *, tiled: bool, tick: Tick = no_tick) -> torch.Tensor:
        out = _per_sample(self.vae.encoder, x)
        tick(1)
        return out

    def steps(self, x: torch.Tensor, task: str) -> int:
        return 1


def _per_sample(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``module`` on each sample of ``x`` alone (its attention mask fails on batches), joined; a
    single sample is returned as it comes, without a copy."""
    if x.shape[0] == 1:
        return module(x)
    return torch.cat([module(sample) for sample in x.split(1)])
