"""VAE families: one module per family, holding everything that differs between them.

A family declares which diffusers classes it covers, what their configs say about latents (channels,
compression, patches), how pipelines (un)scale those latents, diffusers' tile grid for the class,
and how diffusers runs one tile of a loaded model. The planner, engine, launcher, outputs and CLI
ask the family (``spec.family``) and never name a class.
"""

from __future__ import annotations

from dataclasses import fields

from vaepar.errors import VaeparError
from vaepar.families.base import Family, ShardLeaves, Tick
from vaepar.families.flux2 import Flux2Family
from vaepar.families.hunyuanvideo15 import HunyuanVideo15Family
from vaepar.families.kl import KLFamily
from vaepar.families.ltx2 import LTX2Family
from vaepar.families.qwenimage import QwenImageFamily
from vaepar.families.wan import WanFamily

FAMILIES: tuple[type[Family], ...] = (KLFamily, Flux2Family, QwenImageFamily, WanFamily, HunyuanVideo15Family,
                                      LTX2Family)
SUPPORTED: tuple[str, ...] = tuple(name for family in FAMILIES for name in family.classes)

__all__ = ["FAMILIES", "SUPPORTED", "Family", "ShardLeaves", "Tick", "all_shard_leaves", "of"]


def all_shard_leaves() -> ShardLeaves:
    """Every family's shard leaves together."""
    leaves = []
    for family in FAMILIES:
        try:
            leaves.append(family.shard_leaves())
        except ImportError:  # a class the installed diffusers release does not have (LTX-2 before 0.37)
            continue
    return ShardLeaves(**{f.name: tuple(t for lv in leaves for t in getattr(lv, f.name)) for f in fields(ShardLeaves)})


def of(class_name: str) -> type[Family]:
    """The family of a diffusers VAE class name."""
    for family in FAMILIES:
        if class_name in family.classes:
            return family
    raise VaeparError(f"unsupported VAE class {class_name}; supported: {', '.join(SUPPORTED)}")
