"""The ``tiled`` strategy: diffusers' tile grid spread over ranks, merged bit-identically.

Each rank runs its own tiles (a contiguous run in scan order, :func:`vaepar.plan.assign`). Ranks swap
only the raw trailing strips their neighbours' merge reads (:meth:`vaepar.plan.Grid.strips_suffice`
says this is enough), merge their own tiles exactly (:func:`blend.finish_tile`) and send rank 0
the disjoint cores: the result crosses the network once and equals diffusers' serial merge.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from vaepar import blend, plan
from vaepar.comm import Comm

RunTile = Callable[[torch.Tensor], torch.Tensor]
Finish = Callable[[list[torch.Tensor]], list[torch.Tensor]]
"""Collective: every rank calls it once per run with its own parts of the result (possibly none),
before they are joined, and gets them back in the form to join: the same shapes, any dtype."""


def run(x: torch.Tensor, grid: plan.Grid, run_tile: RunTile, comm: Comm, *, share: bool = False,
        finish: Finish | None = None) -> torch.Tensor | None:
    """Run every tile of ``x`` (``(..., H, W)``) on its owner; the merged result on rank 0 (on
    every rank if ``share``). ``finish``: applied to each rank's merged tile cores before the join,
    so that the join moves (and rank 0 assembles) them in its dtype."""
    owners = plan.assign(grid.weights(), comm.world)
    raw = {t: run_tile(tile_input(x, grid, t)) for t in range(grid.count) if owners[t] == comm.rank}
    if all(r == 0 for r in owners):
        whole = [blend.merge([raw[t] for t in range(grid.count)], grid)] if comm.rank == 0 else []
        out = next(iter(finished(whole, finish)), None)
        return comm.broadcast(out) if share else out
    # Holds for every grid whose cores follow the stride (plan.Axis.aligned), the only ones planned.
    assert grid.strips_suffice()
    return _merge_from_strips(raw, grid, owners, comm, _lead_shape(raw, comm), share, finish)


def finished(parts: list[torch.Tensor], finish: Finish | None) -> list[torch.Tensor]:
    """``parts`` through ``finish`` (collective when there is one), else as they are."""
    return parts if finish is None else finish(parts)


def tile_input(x: torch.Tensor, grid: plan.Grid, t: int) -> torch.Tensor:
    """The input slice of tile ``t``."""
    i, j = grid.position(t)
    r, c = grid.rows, grid.cols
    return x[..., r.starts[i] : r.starts[i] + r.sizes[i], c.starts[j] : c.starts[j] + c.sizes[j]]


def _lead_shape(raw: dict[int, torch.Tensor], comm: Comm) -> tuple[tuple[int, ...], torch.dtype]:
    """Leading (non-spatial) output dims and dtype, from rank 0's first tile (rank 0 always owns
    tile 0)."""
    mine = (tuple(raw[0].shape[:-2]), raw[0].dtype) if comm.rank == 0 else None
    return comm.broadcast_object(mine)


def _strip_needs(grid: plan.Grid, u: int) -> list[tuple[str, int, slice, slice]]:
    """What merging tile ``u`` reads from its neighbours: (kind, source tile, rows, cols).

    A blend extent of 0 (``--tile-overlap 0``) reads nothing: no empty strips are sent.
    """
    i, j = grid.position(u)
    ev = grid.rows.extent(i) if i > 0 else 0
    eh = grid.cols.extent(j) if j > 0 else 0
    full = slice(None)
    needs = []
    if ev:
        needs.append(("up", grid.index(i - 1, j), slice(-ev, None), full))
    if eh:
        needs.append(("left", grid.index(i, j - 1), full, slice(-eh, None)))
    if ev and eh:
        needs.append(("corner", grid.index(i - 1, j - 1), slice(-ev, None), slice(-eh, None)))
    return needs


def _strip_shape(grid: plan.Grid, src: int, rows: slice, cols: slice, lead: tuple[int, ...]) -> tuple[int, ...]:
    i, j = grid.position(src)
    h = len(range(grid.rows.out_sizes[i])[rows])
    w = len(range(grid.cols.out_sizes[j])[cols])
    return (*lead, h, w)


def _merge_from_strips(
    raw: dict[int, torch.Tensor], grid: plan.Grid, owners: tuple[int, ...], comm: Comm,
    meta: tuple[tuple[int, ...], torch.dtype], share: bool, finish: Finish | None,
) -> torch.Tensor | None:
    lead, dtype = meta
    got: dict[tuple[int, str], torch.Tensor] = {}
    sends, recvs = [], []
    for u in range(grid.count):
        for kind, src, rows, cols in _strip_needs(grid, u):
            if owners[src] == comm.rank and owners[u] == comm.rank:
                got[u, kind] = raw[src][..., rows, cols].clone()
            elif owners[src] == comm.rank:
                sends.append((owners[u], raw[src][..., rows, cols]))
            elif owners[u] == comm.rank:
                buf = torch.empty(_strip_shape(grid, src, rows, cols, lead), dtype=dtype, device=comm.device)
                got[u, kind] = buf
                recvs.append((owners[src], buf))
    comm.exchange(sends, recvs)
    cores = {}
    for t in sorted(raw):
        merged = blend.finish_tile(raw[t], got.get((t, "up")), got.get((t, "left")), got.get((t, "corner")))
        cores[t] = blend.core(merged, grid, *grid.position(t))
    if finish is not None:
        cores = dict(zip(cores, finish(list(cores.values()))))
        # rank 0 owns tile 0; every rank allocates receive buffers in the finished dtype
        dtype = comm.broadcast_object(cores[0].dtype if comm.rank == 0 else None) if share else dtype
    if share:
        return _share_cores(cores, grid, owners, comm, lead, dtype)
    return _gather_cores(cores, grid, owners, comm, lead)


def _target(out: torch.Tensor, grid: plan.Grid, t: int) -> torch.Tensor:
    """Where tile ``t``'s core lands in the result."""
    i, j = grid.position(t)
    (_, h), (_, w) = grid.rows.span(i), grid.cols.span(j)
    return out[..., grid.rows.offsets[i] : grid.rows.offsets[i] + h, grid.cols.offsets[j] : grid.cols.offsets[j] + w]


def _share_cores(cores: dict[int, torch.Tensor], grid: plan.Grid, owners: tuple[int, ...], comm: Comm,
                 lead: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Every rank receives every core: each owner broadcasts its cores as one flat buffer."""
    out = torch.empty((*lead, grid.rows.length, grid.cols.length), dtype=dtype, device=comm.device)
    targets = {t: _target(out, grid, t) for t in range(grid.count)}
    for r in sorted(set(owners)):
        tiles = [t for t in range(grid.count) if owners[t] == r and targets[t].numel()]
        sizes = [targets[t].numel() for t in tiles]
        if r == comm.rank:
            flat = torch.cat([cores[t].reshape(-1) for t in tiles]) if tiles else out.new_empty(0)
        else:
            flat = out.new_empty(sum(sizes))
        comm.broadcast_from(r, flat)
        for t, piece in zip(tiles, flat.split(sizes)):
            targets[t].copy_(piece.view(targets[t].shape))
    return out


def _gather_cores(
    cores: dict[int, torch.Tensor], grid: plan.Grid, owners: tuple[int, ...], comm: Comm,
    lead: tuple[int, ...],
) -> torch.Tensor | None:
    """Rank 0 receives every core and places it; other ranks send theirs."""
    if comm.rank != 0:
        comm.exchange([(0, c) for t, c in sorted(cores.items()) if c.numel()], [])
        return None
    out = torch.empty((*lead, grid.rows.length, grid.cols.length), dtype=cores[0].dtype, device=comm.device)
    recvs, places = [], []
    for t in range(grid.count):
        target = _target(out, grid, t)
        if owners[t] == 0:
            target.copy_(cores[t])
        elif target.numel():
            buf = torch.empty_like(target)
            recvs.append((owners[t], buf))
            places.append((target, buf))
    comm.exchange([], recvs)
    for target, buf in places:
        target.copy_(buf)
    return out
