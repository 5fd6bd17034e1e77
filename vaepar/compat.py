"""The diffusers releases vaepar is tested on, and a check of the internals it relies on.

vaepar runs diffusers' own per-tile code and swaps leaf modules for the ``shard`` strategy, so it
reads a few private attributes (Wan's time caches, causal padding, ``Downsample2D``'s padding).
A release outside :data:`DIFFUSERS` or a VAE whose internals differ fails early with one line
instead of decoding wrongly. ``VAEPAR_ANY_DIFFUSERS=1`` skips the version check (not the
internals check).
"""

from __future__ import annotations

import os

from torch import nn

from vaepar.errors import VaeparError

# Lowest tested and first unsupported release; pyproject.toml pins the same (tests/test_hardening.py
# checks). 0.35.x is out: its Wan 2.2 tiled decode omits ``first_chunk`` and its tiled encode skips
# patchifying, so diffusers' own reference results are wrong there.
DIFFUSERS = ("0.36.0", "0.43")
WAN_ATTRIBUTES = ("_feat_map", "_conv_idx", "_enc_feat_map", "_enc_conv_idx", "clear_cache")


def requirement() -> str:
    """The supported range as a pip requirement."""
    low, high = DIFFUSERS
    return f"diffusers>={low},<{high}"


def check_diffusers(version: str | None = None) -> None:
    """Raise :class:`VaeparError` if the installed (or given) diffusers is outside the range."""
    from packaging.version import Version

    if version is None:
        import diffusers

        version = diffusers.__version__
    low, high = DIFFUSERS
    if Version(low) <= Version(version) < Version(high) or os.environ.get("VAEPAR_ANY_DIFFUSERS") == "1":
        return
    raise VaeparError(f"diffusers {version} is not supported: vaepar is tested on {requirement()} "
                      f"(pip install '{requirement()}'; VAEPAR_ANY_DIFFUSERS=1 to try anyway)")


def check_model(vae: nn.Module) -> None:
    """Raise :class:`VaeparError` if the loaded VAE lacks an internal that vaepar drives."""
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d
    from diffusers.models.downsampling import Downsample2D

    name = type(vae).__name__
    missing = []
    if name == "AutoencoderKLWan":
        if callable(getattr(vae, "clear_cache", None)):
            vae.clear_cache()  # creates the time caches vaepar drives
        missing += [a for a in WAN_ATTRIBUTES if not hasattr(vae, a)]
    for m in vae.modules():
        if isinstance(m, WanCausalConv3d) and len(getattr(m, "_padding", ())) != 6:
            missing.append("WanCausalConv3d._padding (6 values)")
        if isinstance(m, Downsample2D) and not all(hasattr(m, a) for a in ("padding", "use_conv", "norm", "conv")):
            missing.append("Downsample2D.padding/use_conv/norm/conv")
    if missing:
        import diffusers

        raise VaeparError(f"{name} in diffusers {diffusers.__version__} lacks {', '.join(sorted(set(missing)))}, "
                          f"which vaepar drives; install '{requirement()}'")
