"""The engine: one decode or encode of one input by one strategy over a group of ranks.

Every front-end runs here: the CLI worker (result on rank 0, which writes it) and
:func:`vaepar.parallelize` (result on every rank). :func:`choose` picks the strategy and tile
grid (pure, the same on every rank); :func:`execute` runs it: ``none`` and ``tiled`` through
:mod:`vaepar.tiled`, ``shard`` and ``patch`` through :mod:`vaepar.shard`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from vaepar import plan, shard, tiled
from vaepar.comm import Comm
from vaepar.errors import VaeparError
from vaepar.families import Family, Tick
from vaepar.vae import ModelSpec

BANDED = ("shard", "patch")


def choose(spec: ModelSpec, strategy: str, tile_size: int | None, tile_overlap: float | None, task: str,
           shape: tuple[int, ...], world: int = 1) -> tuple[str, plan.Grid]:
    """The strategy and tile grid for an input of ``shape``, the same on every rank.

    ``shape`` is the latent's (decode) or the pixels' as the encoder's tiles slice them (encode).
    ``auto``: ``shard`` on several workers when the input has at least two latent rows and no tile
    size was given; otherwise ``tiled`` when the input is larger than one tile (diffusers' own
    test), else ``none``. ``shard`` and ``patch`` split rows into bands; their grid is the untiled one.
    """
    h, w = shape[-2], shape[-1]
    tile = tile_size or spec.default_tile
    tile_overlap = spec.family.default_overlap(spec.config) if tile_overlap is None else tile_overlap
    make = spec.family.decode_grid if task == "decode" else spec.family.encode_grid
    untiled = make(spec, h, w, None, tile_overlap)
    if strategy == "auto" and world > 1 and tile_size is None and latent_rows(spec, task, h) >= 2:
        strategy = "shard"
    if strategy in ("none", *BANDED):
        return strategy, untiled
    grid = make(spec, h, w, tile, tile_overlap)
    if strategy == "auto":
        strategy = "tiled" if grid.tiled else "none"
        if strategy == "none":
            return strategy, untiled
    if not (grid.rows.aligned() and grid.cols.aligned()):
        raise VaeparError(
            f"tile size {tile} with overlap {tile_overlap} puts tile cores out of step with the "
            "tile stride (diffusers would return a wrongly sized result); pick an overlap that makes "
            "tile * overlap a multiple of the model's scale")
    return strategy, grid


def latent_rows(spec: ModelSpec, task: str, h: int) -> int:
    """Latent rows of an input with ``h`` rows (encode: pixel rows as the encoder's tiles see them)."""
    return h if task == "decode" else h // (spec.scale // spec.patch_size)


def part_count(strategy: str, grid: plan.Grid, rows: int, world: int) -> int:
    """Tiles (none, tiled) or bands (shard, patch) the job is split into."""
    return len(plan.bands(rows, world)) if strategy in BANDED else grid.count


def check_shardable(family: Family) -> None:
    """Refuse ``shard`` for a model that the wrappers cannot split exactly (the same on every rank:
    it depends on the model alone), naming what stands in the way."""
    # walked every job (~1.5 ms for SD): a caller may swap modules between jobs
    problems = family.shard_refusals() + shard.unhandled(family.vae)
    if problems:
        more = f" and {len(problems) - 3} more" if len(problems) > 3 else ""
        raise VaeparError(f"--strategy shard cannot split this {family.spec.class_name} exactly: "
                          f"{'; '.join(problems[:3])}{more} not handled by vaepar's shard wrappers; "
                          "use --strategy tiled or patch")


def input_rows(spec: ModelSpec, task: str, strategy: str, grid: plan.Grid, rows: int, world: int,
               halo: int = 8) -> list[tuple[int, int]]:
    """Per rank, the span of input rows (dim -2 of the tensor :func:`execute` takes) that its share
    reads: its band (with ``patch``'s margin), or the rows of the tiles it owns; (0, 0) for a rank
    with nothing to do. The same on every rank."""
    if strategy in BANDED:
        unit = spec.scale // spec.patch_size if task == "encode" else 1
        units = latent_rows(spec, task, rows)
        margin = halo if strategy == "patch" else 0
        spans = [(a * unit, b * unit) for a, b in plan.widened(plan.bands(units, world), margin, units)]
        return spans + [(0, 0)] * (world - len(spans))
    owners = plan.assign(grid.weights(), world)
    spans = []
    for rank in range(world):
        mine = [grid.position(t)[0] for t in range(grid.count) if owners[t] == rank]
        r = grid.rows
        spans.append((min(r.starts[i] for i in mine), max(r.starts[i] + r.sizes[i] for i in mine)) if mine else (0, 0))
    return spans


def _no_tick(n: int) -> None:
    pass


def execute(family: Family, task: str, strategy: str, x: torch.Tensor, grid: plan.Grid, comm: Comm, *,
            halo: int = 8, groups: dict[int, object] | None = None, tick: Tick = _no_tick,
            on_part: Callable[[], None] | None = None, share: bool = False,
            finish: tiled.Finish | None = None) -> tuple[torch.Tensor | None, shard.BandStats | None]:
    """Run ``task`` on ``x`` by ``strategy``: every rank its share, then the joined raw result
    (decoder output, or latent moments) on rank 0, or on every rank when ``share``.

    ``finish`` (collective, :data:`vaepar.tiled.Finish`) turns each rank's own part of the raw
    result (merged tile cores, or its band) into the form to join, before the join: the CLI's
    PNG/MP4 outputs convert to uint8 there, so the gather moves a quarter of float32's bytes.

    Returns the result (None where it is not kept) and, for banded strategies, this rank's band
    statistics.
    """
    if strategy == "shard":
        check_shardable(family)
    tile_fn = family.decode_tile if task == "decode" else family.encode_tile

    def run_part(part: torch.Tensor) -> torch.Tensor:
        if on_part is not None:
            on_part()
        return tile_fn(part, tiled=grid.tiled, tick=tick)

    with family.heap_trimmed():
        if strategy not in BANDED:
            with family.activations_in_place():
                return tiled.run(x, grid, run_part, comm, share=share, finish=finish), None
        # Not for bands: on CPU (glibc) in-place activations made `shard` ~8 % slower and its peak
        # RSS higher (SD 512², 2 ranks; docs/benchmarks.md), though they speed up whole tiles.
        unit = family.spec.scale // family.spec.patch_size
        unit_in, unit_out = (1, unit) if task == "decode" else (unit, 1)
        return shard.run(x, latent_rows(family.spec, task, x.shape[-2]), unit_in, lambda u: u * unit_out,
                         run_part, comm, halo=halo if strategy == "patch" else None, groups=groups,
                         share=share, finish=finish)
