"""The library API: make a loaded diffusers VAE decode and encode across the ranks of your job.

:func:`parallelize` swaps the VAE's own ``_decode`` / ``_encode`` for vaepar's engine (the same
one the CLI runs), so ``vae.decode(z)``, ``vae.encode(x)``, a pipeline's ``pipe(...)`` and
diffusers' slicing, return types and posterior all behave as before, with the work split over
the group. :func:`unparallelize` undoes it.
"""

from __future__ import annotations

import types
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from vaepar import compat, engine, shard
from vaepar.comm import Comm
from vaepar.errors import OptionError
from vaepar.families import SUPPORTED, Family
from vaepar.vae import ModelSpec

STRATEGIES = ("auto", "none", "tiled", "shard", "patch")
_STATE = "_vaepar_state"


@dataclass(frozen=True, kw_only=True, slots=True)
class Options:
    """What :func:`parallelize` was asked for."""

    strategy: str = "auto"
    group: Any = None
    tile_size: int | None = None
    tile_overlap: float | None = None
    halo: int = 8

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise OptionError(f"unknown strategy {self.strategy!r}; choose from {', '.join(STRATEGIES)}")
        if self.tile_overlap is not None and not 0 <= self.tile_overlap < 0.5:
            raise OptionError(f"tile_overlap must be in [0, 0.5), got {self.tile_overlap}")
        if self.tile_size is not None and self.tile_size <= 0:
            raise OptionError(f"tile_size must be positive, got {self.tile_size}")
        if self.halo < 0:
            raise OptionError(f"halo must be at least 0, got {self.halo}")


@dataclass(kw_only=True, slots=True)
class _State:
    options: Options
    family: Family
    groups: dict[int, object] = field(default_factory=dict)


def parallelize(vae: nn.Module, *, strategy: str = "auto", group: Any = None, tile_size: int | None = None,
                tile_overlap: float | None = None, halo: int = 8) -> nn.Module:
    """Make ``vae.decode`` and ``vae.encode`` run across the ranks of ``group``, in place.

    ``vae``: a loaded VAE of a supported class (``vaepar.families.SUPPORTED``). ``group``: a process group the
    caller initialised (default: the default group; without one, or with one rank, the VAE runs
    as before). Every rank must call ``decode``/``encode`` with the same input, as a pipeline
    running on every rank does, and every rank gets diffusers' own return value: a
    ``DecoderOutput`` (a tuple with ``return_dict=False``), an ``AutoencoderKLOutput`` whose
    ``latent_dist`` has ``.mode()`` and ``.sample(generator)``.

    Strategies: ``shard`` splits rows into one band per rank and exchanges halo rows inside every
    layer (equal to the untiled decode to float rounding, activations ~1/N per rank); ``tiled``
    spreads diffusers' tile grid over the ranks, bit-identical to diffusers' serial tiled decode
    and encode (tiles from ``tile_size``/``tile_overlap``, else from the VAE's own tiling
    attributes after ``vae.enable_tiling()``; ``tile_overlap`` defaults to the class's own); ``patch`` runs bands with ``halo`` latent rows of
    margin and no communication (approximate); ``auto`` is ``tiled`` when tiling is enabled or
    ``tile_size`` is given, else ``shard``. Inputs with fewer latent rows than ranks run whole on
    every rank. Under ``no_grad``/``inference_mode``, whole and tiled decodes run the activations
    that only take a norm's fresh output (KL, FLUX.2, Wan, Qwen-Image) in place: the same values.

    Cost: besides the strategy's own traffic (halo rows, GroupNorm sums, attention gathers for
    ``shard``; blend strips for ``tiled``), every rank receives the whole result once: each rank
    broadcasts its own rows (``shard``, ``patch``) or tile cores (``tiled``), nothing padded. One
    small object all-gather per call checks that every rank passed the same shape and dtype
    (different inputs raise ``ValueError`` on every rank instead of hanging).
    Call under ``torch.no_grad()`` or ``torch.inference_mode()`` (no backward pass).

    Example (run with ``torchrun --nproc-per-node 2 script.py``)::

        import torch.distributed as dist, vaepar
        from diffusers import AutoencoderKL
        dist.init_process_group("gloo")
        vae = vaepar.parallelize(AutoencoderKL.from_pretrained("path/to/vae"))
        with torch.no_grad():
            image = vae.decode(latents).sample      # the same full image on every rank
    """
    options = Options(strategy=strategy, group=group, tile_size=tile_size, tile_overlap=tile_overlap, halo=halo)
    if getattr(vae, _STATE, None) is not None:
        unparallelize(vae)
    name = type(vae).__name__
    if name not in SUPPORTED:
        raise OptionError(f"vaepar.parallelize supports {', '.join(SUPPORTED)}, not {name}")
    compat.check_model(vae)
    spec = ModelSpec(name=name, source="", subfolder="", local=True, config={**vae.config, "_class_name": name})
    shard.install(vae, spec.family.shard_leaves())
    object.__setattr__(vae, _STATE, _State(options=options, family=spec.family(vae, spec)))
    vae._decode = types.MethodType(_decode, vae)
    vae._encode = types.MethodType(_encode, vae)
    return vae


def unparallelize(vae: nn.Module) -> nn.Module:
    """Undo :func:`parallelize`: the VAE's own modules and methods again, bit for bit."""
    if getattr(vae, _STATE, None) is None:
        return vae
    for name in ("_decode", "_encode"):
        vae.__dict__.pop(name, None)
    shard.uninstall(vae)
    object.__delattr__(vae, _STATE)
    return vae


def _decode(self: nn.Module, z: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
    """The class's ``_decode(z, ...)``, parallel: its extra arguments go to the family (LTX-2's
    ``temb``), and the result takes the form the class's own ``_decode`` returns."""
    from diffusers.models.autoencoders.vae import DecoderOutput

    family = getattr(self, _STATE).family
    family.decode_arguments(*args, **kwargs)
    out = _run(self, "decode", z)
    if out is None:
        with family.activations_in_place(), family.heap_trimmed():
            return type(self)._decode(self, z, *args, **kwargs)
    sample = family.finish_decode(out)
    if family.decode_returns_tensor:
        return sample
    return DecoderOutput(sample=sample) if kwargs.get("return_dict", True) else (sample,)


def _encode(self: nn.Module, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    out = _run(self, "encode", x)
    if out is None:
        with getattr(self, _STATE).family.activations_in_place():
            return type(self)._encode(self, x, *args, **kwargs)
    return out


def _run(vae: nn.Module, task: str, x: torch.Tensor) -> torch.Tensor | None:
    """The joined raw result on every rank, or None where the VAE's own method should run (one
    rank, strategy ``none``, or too few rows for the ranks)."""
    state: _State = getattr(vae, _STATE)
    comm = Comm.of_group(state.options.group, x.device)
    if comm.world == 1:
        return None
    if torch.is_grad_enabled():
        raise RuntimeError("vaepar's parallel decode/encode has no backward pass: call it under "
                           "torch.no_grad() or torch.inference_mode()")
    shapes = comm.gather_all((tuple(x.shape), str(x.dtype)))
    if len(set(shapes)) > 1:  # plans would differ, and the collectives would never match
        raise ValueError(f"vaepar: every rank must {task} the same input, got (shape, dtype) per rank: {shapes}")
    family, spec = state.family, state.family.spec
    if task == "encode":
        x = family.prepare_encode(x)
    tile, overlap = _tiling(vae, state.options, spec)
    strategy, grid = engine.choose(spec, state.options.strategy, tile, overlap, task, tuple(x.shape), comm.world)
    rows = engine.latent_rows(spec, task, x.shape[-2])
    if strategy == "none" or (strategy in engine.BANDED and rows < comm.world):
        return None
    out, _ = engine.execute(family, task, strategy, x, grid, comm, halo=state.options.halo, groups=state.groups,
                            share=True)
    assert out is not None
    return out


def _tiling(vae: nn.Module, options: Options, spec: ModelSpec) -> tuple[int | None, float]:
    """Tile size and overlap: the options', else the VAE's own tiling attributes when
    ``vae.enable_tiling()`` was called (a tile size makes ``auto`` choose ``tiled``)."""
    if options.tile_size is not None or not getattr(vae, "use_tiling", False):
        return options.tile_size, options.tile_overlap
    return spec.family.own_tiling(vae, spec)
