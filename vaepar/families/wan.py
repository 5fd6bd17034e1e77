"""``AutoencoderKLWan``: Wan 2.1, and Wan 2.2 with ``patch_size`` (video, causal in time;
per-channel ``latents_mean``/``latents_std``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from vaepar import plan
from vaepar.errors import OptionError
from vaepar.families.base import Family, ShardLeaves, Tick, no_tick

if TYPE_CHECKING:
    from vaepar.latents import Factors
    from vaepar.vae import ModelSpec

TILE = 256  # diffusers' tile_sample_min_height/width for this class


class WanFamily(Family):
    classes = ("AutoencoderKLWan",)
    video = True
    scaling_rule = "per channel with its config's latents_mean/latents_std"

    @classmethod
    def latent_channels(cls, config: dict[str, Any]) -> int:
        return int(config["z_dim"])

    @classmethod
    def scale(cls, config: dict[str, Any]) -> int:
        return int(config.get("scale_factor_spatial") or 8)

    @classmethod
    def temporal(cls, config: dict[str, Any]) -> int:
        """Wan 2.2's ``scale_factor_temporal``, else 2 ** the number of temporal downsamples."""
        downsamples = sum(bool(d) for d in config.get("temperal_downsample", ()))
        return int(config.get("scale_factor_temporal") or 2**downsamples)

    @classmethod
    def patch_size(cls, config: dict[str, Any]) -> int:
        return int(config.get("patch_size") or 1)

    @classmethod
    def default_tile(cls, config: dict[str, Any]) -> int:
        return TILE

    @classmethod
    def factors(cls, spec: ModelSpec, scaling: float | None = None, shift: float | None = None) -> Factors:
        """Per channel: ``z * std + mean`` before decode (pipelines divide by ``1 / std``)."""
        from vaepar.latents import Factors

        mean, std = spec.factor("latents_mean"), spec.factor("latents_std")
        return Factors(mean=tuple(mean) if mean else None, std=tuple(std) if std else None)

    @classmethod
    def decode_grid(cls, spec: ModelSpec, h: int, w: int, tile: int | None, overlap: float) -> plan.Grid:
        s, p = spec.scale, cls.patch_size(spec.config)
        if tile is None or (h <= tile // s and w <= tile // s):
            return plan.Grid(rows=plan.single(h, h * s // p), cols=plan.single(w, w * s // p))
        stride = int(tile * (1 - overlap))
        ax = dict(tile=tile // s, stride=stride // s, up=s // p, down=1,
                  blend=tile // p - stride // p, crop=stride // p)
        return plan.Grid(rows=plan.tiled_axis(h, **ax, limit=h * s // p),
                         cols=plan.tiled_axis(w, **ax, limit=w * s // p))

    @classmethod
    def encode_grid(cls, spec: ModelSpec, h: int, w: int, tile: int | None, overlap: float) -> plan.Grid:
        """Over patchified pixels (Wan 2.2); diffusers compares the size before patchifying."""
        p = cls.patch_size(spec.config)
        s = spec.scale // p
        if tile is None or (h * p <= tile and w * p <= tile):
            return plan.Grid(rows=plan.single(h, h // s), cols=plan.single(w, w // s))
        stride = int(tile * (1 - overlap))
        ax = dict(tile=tile, stride=stride, up=1, down=s, blend=tile // s - stride // s, crop=stride // s)
        return plan.Grid(rows=plan.tiled_axis(h, **ax, limit=h // s), cols=plan.tiled_axis(w, **ax, limit=w // s))

    @classmethod
    def own_tiling(cls, vae: torch.nn.Module, spec: ModelSpec) -> tuple[int, float]:
        """``tile_sample_min_height`` and the overlap whose ``int(size * (1 - overlap))`` is the stride."""
        size, stride = vae.tile_sample_min_height, vae.tile_sample_stride_height
        if (size, stride) != (vae.tile_sample_min_width, vae.tile_sample_stride_width):
            raise OptionError("vaepar's tiled strategy needs square tiles: tile_sample_min_height/width and "
                              "tile_sample_stride_height/width must be equal")
        return size, 1 - (stride + 0.5) / size

    @classmethod
    def upsampler_types(cls) -> tuple[type, ...]:
        from diffusers.models.autoencoders.autoencoder_kl_wan import WanResample

        return (WanResample,)

    @classmethod
    def shard_leaves(cls) -> ShardLeaves:
        from diffusers.models.autoencoders.autoencoder_kl_wan import WanAttentionBlock, WanCausalConv3d

        return ShardLeaves(frame_attention=(WanAttentionBlock,), causal_convs=(WanCausalConv3d,))

    @classmethod
    def activation_owners(cls) -> tuple[type, ...]:
        """The classes whose ``nonlinearity`` only ever activates a norm's output."""
        from diffusers.models.autoencoders import autoencoder_kl_wan as wan

        return (wan.WanResidualBlock, wan.WanEncoder3d, wan.WanDecoder3d)

    def fresh_activations(self) -> list[torch.nn.Module]:
        owners = self.activation_owners()
        return [m.nonlinearity for m in self.vae.modules() if isinstance(m, owners)]

    @classmethod
    def prepare_pixels(cls, spec: ModelSpec, x: torch.Tensor) -> torch.Tensor:
        from diffusers.models.autoencoders.autoencoder_kl_wan import patchify

        p = cls.patch_size(spec.config)
        return patchify(x, patch_size=p) if p > 1 else x

    def decode_tile(self, z: torch.Tensor, *, tiled: bool, tick: Tick = no_tick) -> torch.Tensor:
        vae = self.vae
        vae.clear_cache()
        x = z if tiled else vae.post_quant_conv(z)
        frames = []
        for k in range(z.shape[2]):
            vae._conv_idx = [0]
            step = x[:, :, k : k + 1]
            if tiled:
                step = vae.post_quant_conv(step)
            frames.append(self._decode_step(step, k))
            tick(1)
        vae.clear_cache()
        return torch.cat(frames, dim=2)

    def _decode_step(self, step: torch.Tensor, k: int) -> torch.Tensor:
        """Latent frame ``k`` through the decoder and its time cache."""
        vae = self.vae
        return vae.decoder(step, feat_cache=vae._feat_map, feat_idx=vae._conv_idx, first_chunk=(k == 0))

    def encode_tile(self, x: torch.Tensor, *, tiled: bool, tick: Tick = no_tick) -> torch.Tensor:
        """Causal in time: the first frame alone, then chunks of 4, through one cache."""
        vae = self.vae
        vae.clear_cache()
        chunks = []
        for k in range(1 + (x.shape[2] - 1) // 4):
            vae._enc_conv_idx = [0]
            step = x[:, :, :1] if k == 0 else x[:, :, 1 + 4 * (k - 1) : 1 + 4 * k]
            out = vae.encoder(step, feat_cache=vae._enc_feat_map, feat_idx=vae._enc_conv_idx)
            chunks.append(vae.quant_conv(out) if tiled else out)
            tick(1)
        vae.clear_cache()
        moments = torch.cat(chunks, dim=2)
        return moments if tiled else vae.quant_conv(moments)

    def finish_values(self, x: torch.Tensor) -> torch.Tensor:
        """diffusers clamps after unpatchifying; the clamp is elementwise, so its order does not matter."""
        return torch.clamp(x, min=-1.0, max=1.0)

    def arrange(self, x: torch.Tensor) -> torch.Tensor:
        from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify

        p = self.patch_size(self.spec.config)
        return unpatchify(x, patch_size=p) if p > 1 else x
