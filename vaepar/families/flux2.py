"""``AutoencoderKLFlux2``: FLUX.2 (images). The VAE is AutoencoderKL's encoder and decoder; its
pipelines normalise latents with the VAE's BatchNorm statistics over 2x2 patches.

``Flux2Pipeline`` packs latents as tokens ``(B, (H/16)(W/16), 4C)`` of 2x2 patches (channel
``c * 4 + dy * 2 + dx``), normalised per patch channel: ``(z - running_mean) / sqrt(running_var +
batch_norm_eps)``. Unpacked to ``(B, C, H/8, W/8)`` (as vaepar unpacks Flux.1 tokens), each latent
at ``(y, x)`` uses the statistics of patch channel ``(c, y % 2, x % 2)``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from vaepar.families.kl import KLFamily

if TYPE_CHECKING:
    from vaepar.latents import Factors
    from vaepar.vae import ModelSpec

BN_KEYS = ("bn.running_mean", "bn.running_var")


class Flux2Family(KLFamily):
    classes = ("AutoencoderKLFlux2",)
    scaling_rule = "with its BatchNorm statistics over 2x2 patches (bn.running_mean/running_var)"
    scalar_factors = False

    @classmethod
    def latent_channels(cls, config: dict[str, Any]) -> int:
        return int(config.get("latent_channels", 32))

    @classmethod
    def factors(cls, spec: ModelSpec, scaling: float | None = None, shift: float | None = None) -> Factors:
        """The pipeline's ``z * sqrt(running_var + eps) + running_mean`` per 2x2 patch channel, with
        the statistics read from the weights (BatchNorm's initial 0 and 1 for random weights)."""
        import torch

        from vaepar.latents import Factors
        from vaepar.vae import read_weights

        patch = tuple(spec.config.get("patch_size") or (2, 2))
        if patch != (2, 2):
            raise NotImplementedError(f"FLUX.2 latents with patch_size {patch}")
        channels = cls.latent_channels(spec.config) * 4
        if spec.random_weights:
            mean, var = torch.zeros(channels), torch.ones(channels)
        else:
            mean, var = (t.float() for t in read_weights(spec, BN_KEYS).values())
        std = torch.sqrt(var + float(spec.config.get("batch_norm_eps", 1e-4)))
        return Factors(mean=tuple(mean.tolist()), std=tuple(std.tolist()), patch=2)
