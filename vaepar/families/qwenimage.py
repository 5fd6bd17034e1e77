"""``AutoencoderKLQwenImage``: Qwen-Image (images). The VAE is Wan 2.1's causal 3-D design run on
one frame; its pipelines pack latents as FLUX does (2x2 tokens, ``(B, N, 4C)``) and (un)scale them
per channel with the config's ``latents_mean``/``latents_std``.

vaepar treats it as an image model: latents ``(B, C, H, W)`` and pixels ``(B, 3, H, W)``, with the
frame axis the class works on added around each tile (a latent file may also hold
``(B, C, 1, H, W)``). Unlike Wan, the decoder takes no ``first_chunk`` and diffusers clamps the
untiled decode only, not the tiled one.
"""

from __future__ import annotations

from typing import Any

import torch

from vaepar.families.base import Family, ShardLeaves, Tick, no_tick
from vaepar.families.wan import WanFamily


class QwenImageFamily(WanFamily):
    classes = ("AutoencoderKLQwenImage",)
    video = False
    frame_axis = True

    @classmethod
    def scale(cls, config: dict[str, Any]) -> int:
        return 2 ** len(config.get("temperal_downsample", (False, True, True)))

    @classmethod
    def temporal(cls, config: dict[str, Any]) -> int:
        return 1

    @classmethod
    def upsampler_types(cls) -> tuple[type, ...]:
        from diffusers.models.autoencoders.autoencoder_kl_qwenimage import QwenImageResample

        return (QwenImageResample,)

    @classmethod
    def shard_leaves(cls) -> ShardLeaves:
        from diffusers.models.autoencoders.autoencoder_kl_qwenimage import (
            QwenImageAttentionBlock,
            QwenImageCausalConv3d,
        )

        return ShardLeaves(frame_attention=(QwenImageAttentionBlock,), causal_convs=(QwenImageCausalConv3d,))

    @classmethod
    def activation_owners(cls) -> tuple[type, ...]:
        from diffusers.models.autoencoders import autoencoder_kl_qwenimage as qwen

        return (qwen.QwenImageResidualBlock, qwen.QwenImageEncoder3d, qwen.QwenImageDecoder3d)

    def decode_tile(self, z: torch.Tensor, *, tiled: bool, tick: Tick = no_tick) -> torch.Tensor:
        if z.ndim == 4:
            return self.decode_tile(z.unsqueeze(2), tiled=tiled, tick=tick).squeeze(2)
        out = super().decode_tile(z, tiled=tiled, tick=tick)
        return out if tiled else torch.clamp(out, min=-1.0, max=1.0)

    def encode_tile(self, x: torch.Tensor, *, tiled: bool, tick: Tick = no_tick) -> torch.Tensor:
        if x.ndim == 4:
            return self.encode_tile(x.unsqueeze(2), tiled=tiled, tick=tick).squeeze(2)
        return super().encode_tile(x, tiled=tiled, tick=tick)

    def _decode_step(self, step: torch.Tensor, k: int) -> torch.Tensor:
        vae = self.vae
        return vae.decoder(step, feat_cache=vae._feat_map, feat_idx=vae._conv_idx)

    def finish_values(self, x: torch.Tensor) -> torch.Tensor:
        """Unchanged: decode_tile clamps the untiled decode; the tiled one stays unclamped, as in diffusers."""
        return Family.finish_values(self, x)

    def arrange(self, x: torch.Tensor) -> torch.Tensor:
        return Family.arrange(self, x)
