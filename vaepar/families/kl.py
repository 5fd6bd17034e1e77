"""``AutoencoderKL``: SD 1.x/2.x, SDXL, SD3, Flux.1 (images; scaling_factor and shift_factor)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from vaepar import plan
from vaepar.errors import OptionError
from vaepar.families.base import Family, ShardLeaves, Tick, no_tick

if TYPE_CHECKING:
    from vaepar.latents import Factors
    from vaepar.vae import ModelSpec


class KLFamily(Family):
    classes = ("AutoencoderKL",)
    scalar_factors = True
    scaling_rule = "z / scaling_factor + shift_factor"

    @classmethod
    def latent_channels(cls, config: dict[str, Any]) -> int:
        return int(config.get("latent_channels", 4))

    @classmethod
    def scale(cls, config: dict[str, Any]) -> int:
        return 2 ** (len(config.get("block_out_channels", (64,))) - 1)

    @classmethod
    def default_tile(cls, config: dict[str, Any]) -> int:
        """``sample_size``, as diffusers' ``tile_sample_min_size``."""
        size = config.get("sample_size", 512)
        return int(size[0] if isinstance(size, (list, tuple)) else size)

    @classmethod
    def factors(cls, spec: ModelSpec, scaling: float | None = None, shift: float | None = None) -> Factors:
        """``z / scaling_factor + shift_factor`` before decode."""
        from vaepar.latents import Factors

        return Factors(scaling=scaling if scaling is not None else spec.factor("scaling_factor"),
                       shift=shift if shift is not None else spec.factor("shift_factor"))

    @classmethod
    def decode_grid(cls, spec: ModelSpec, h: int, w: int, tile: int | None, overlap: float) -> plan.Grid:
        s = spec.scale
        if tile is None:
            return plan.Grid(rows=plan.single(h, h * s), cols=plan.single(w, w * s))
        return plan.kl_decode_grid(h, w, tile=tile, overlap=overlap, scale=s)

    @classmethod
    def encode_grid(cls, spec: ModelSpec, h: int, w: int, tile: int | None, overlap: float) -> plan.Grid:
        s = spec.scale
        if tile is None:
            return plan.Grid(rows=plan.single(h, h // s), cols=plan.single(w, w // s))
        return plan.kl_encode_grid(h, w, tile=tile, overlap=overlap, scale=s)

    @classmethod
    def own_tiling(cls, vae: torch.nn.Module, spec: ModelSpec) -> tuple[int, float]:
        size = vae.tile_sample_min_size
        if vae.tile_latent_min_size != size // spec.scale:
            raise OptionError("vaepar's tiled strategy needs tile_latent_min_size = tile_sample_min_size // scale")
        return size, vae.tile_overlap_factor

    @classmethod
    def upsampler_types(cls) -> tuple[type, ...]:
        from diffusers.models.upsampling import Upsample2D

        return (Upsample2D,)

    @classmethod
    def shard_leaves(cls) -> ShardLeaves:
        from diffusers.models.attention_processor import Attention

        return ShardLeaves(attention=(Attention,))

    def fresh_activations(self) -> list[torch.nn.Module]:
        """diffusers' ``ResnetBlock2D`` activates its norms' outputs (and a time embedding, which
        VAE blocks have none of); ``Encoder``/``Decoder`` activate ``conv_norm_out``'s output."""
        from diffusers.models.autoencoders.vae import Decoder, Encoder
        from diffusers.models.resnet import ResnetBlock2D

        out = []
        for m in self.vae.modules():
            if isinstance(m, ResnetBlock2D) and m.time_emb_proj is None:
                out.append(m.nonlinearity)
            elif isinstance(m, (Encoder, Decoder)):
                out.append(m.conv_act)
        return out

    def decode_tile(self, z: torch.Tensor, *, tiled: bool, tick: Tick = no_tick) -> torch.Tensor:
        if self.vae.config.use_post_quant_conv:
            z = self.vae.post_quant_conv(z)
        out = self.vae.decoder(z)
        tick(1)
        return out

    def encode_tile(self, x: torch.Tensor, *, tiled: bool, tick: Tick = no_tick) -> torch.Tensor:
        h = self.vae.encoder(x)
        if self.vae.config.use_quant_conv:
            h = self.vae.quant_conv(h)
        tick(1)
        return h
