"""``AutoencoderKLLTX2Video``: LTX-2 (video, 32x spatial and 8x temporal compression, 128 latent
channels; pixels enter the encoder as 4x4 patches).

The class decodes and encodes the whole clip in one call (no time cache); its 3-D convolutions
repeat edge frames in time and, in the decoder, pad image edges by reflection. No attention and no
GroupNorm, so ``shard`` needs conv halos only. Spatial tiling is Wan's geometry (tile 512, stride
448 by default: overlap 0.125). ``LTX2Pipeline`` with ``output_type="latent"`` returns latents
already denormalised (``z * latents_std / scaling_factor + latents_mean``), ready for ``vae.decode``,
so vaepar decodes them as they are; a decoder with timestep conditioning gets the pipeline's
default ``decode_timestep`` of 0.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from vaepar import plan
from vaepar.errors import VaeparError
from vaepar.families.base import Family, ShardLeaves, Tick, no_tick
from vaepar.families.wan import WanFamily

if TYPE_CHECKING:
    from vaepar.latents import Factors
    from vaepar.vae import ModelSpec

TILE = 512  # diffusers' tile_sample_min_height/width for this class (stride 448)


def _compression(config: dict[str, Any], axis: str) -> int:
    """The config's ``{axis}_compression_ratio``, else the patch size times 2 per down-block that
    scales along ``axis`` (``spatial``/``temporal``)."""
    if config.get(f"{axis}_compression_ratio"):
        return int(config[f"{axis}_compression_ratio"])
    kinds = config.get("downsample_type", ("spatial", "temporal", "spatiotemporal", "spatiotemporal"))
    scaling = config.get("spatio_temporal_scaling", True)
    scaling = (scaling,) * len(kinds) if isinstance(scaling, bool) else scaling
    steps = sum(1 for kind, on in zip(kinds, scaling) if on and axis in kind)
    patch = config.get("patch_size", 4) if axis == "spatial" else config.get("patch_size_t", 1)
    return int(patch) * 2**steps


class LTX2Family(WanFamily):
    classes = ("AutoencoderKLLTX2Video",)
    scaling_rule = ("not at all: LTX2Pipeline's output_type='latent' returns latents already "
                    "denormalised for vae.decode")

    @classmethod
    def latent_channels(cls, config: dict[str, Any]) -> int:
        return int(config.get("latent_channels", 128))

    @classmethod
    def scale(cls, config: dict[str, Any]) -> int:
        return _compression(config, "spatial")

    @classmethod
    def temporal(cls, config: dict[str, Any]) -> int:
        return _compression(config, "temporal")

    @classmethod
    def patch_size(cls, config: dict[str, Any]) -> int:
        """1: the encoder patchifies pixels itself, so tiles slice plain pixels."""
        return 1

    @classmethod
    def default_tile(cls, config: dict[str, Any]) -> int:
        return TILE

    @classmethod
    def default_overlap(cls, config: dict[str, Any]) -> float:
        return 0.125

    @classmethod
    def decode_grid(cls, spec: ModelSpec, h: int, w: int, tile: int | None, overlap: float) -> plan.Grid:
        """Wan's grid; refused where a tile would have 1 latent row or column, which the decoder's
        reflection padding cannot pad (diffusers fails there too)."""
        grid = super().decode_grid(spec, h, w, tile, overlap)
        if min(grid.rows.sizes + grid.cols.sizes) < 2:
            where = "latents" if not grid.tiled else f"a tile of --tile-size {tile}"
            raise VaeparError(f"{spec.class_name} pads by reflection and needs at least 2 latent rows and "
                              f"columns, but {where} of latents {h}x{w} would have 1; pick another tile size")
        return grid

    @classmethod
    def factors(cls, spec: ModelSpec, scaling: float | None = None, shift: float | None = None) -> Factors:
        from vaepar.latents import Factors

        return Factors()

    @classmethod
    def activation_owners(cls) -> tuple[type, ...]:
        """None: LTX-2's resnets inject noise and timestep terms between norm and activation
        (not audited for reuse), so its activations run as diffusers wrote them."""
        return ()

    @classmethod
    def upsampler_types(cls) -> tuple[type, ...]:
        from diffusers.models.autoencoders.autoencoder_kl_ltx2 import LTX2VideoUpsampler3d

        return (LTX2VideoUpsampler3d,)

    @classmethod
    def shard_leaves(cls) -> ShardLeaves:
        from diffusers.models.autoencoders.autoencoder_kl_ltx2 import LTX2VideoCausalConv3d

        return ShardLeaves(edge_frame_convs=(LTX2VideoCausalConv3d,))

    def __init__(self, vae: torch.nn.Module, spec: ModelSpec) -> None:
        super().__init__(vae, spec)
        self.temb: torch.Tensor | None = None
        self.causal: bool | None = None

    def shard_refusals(self) -> list[str]:
        """Decoder noise injection draws noise of each call's own size, so bands would differ."""
        noisy = [name for name, m in self.vae.named_modules() if getattr(m, "per_channel_scale1", None) is not None]
        return [f"{noisy[0]} (decoder_inject_noise: random noise of each call's size)"] if noisy else []

    def decode_arguments(self, temb: torch.Tensor | None = None, causal: bool | None = None,
                         return_dict: bool = True) -> None:
        """``vae.decode(z, temb, causal)``'s timestep and causality (vaepar's own runs: none)."""
        self.temb, self.causal = temb, causal

    def decode_tile(self, z: torch.Tensor, *, tiled: bool, tick: Tick = no_tick) -> torch.Tensor:
        temb = self.temb
        if temb is None and self.vae.config.timestep_conditioning:
            temb = z.new_zeros(z.shape[0])  # the pipeline's default decode_timestep
        out = self.vae.decoder(z, temb, causal=self.causal)
        tick(1)
        return out

    def encode_tile(self, x: torch.Tensor, *, tiled: bool, tick: Tick = no_tick) -> torch.Tensor:
        out = self.vae.encoder(x)
        tick(1)
        return out

    def finish_values(self, x: torch.Tensor) -> torch.Tensor:
        """Unchanged: LTX-2 neither clamps nor unpatchifies after the decoder."""
        return Family.finish_values(self, x)

    def arrange(self, x: torch.Tensor) -> torch.Tensor:
        return Family.arrange(self, x)

    def steps(self, x: torch.Tensor, task: str) -> int:
        return 1
