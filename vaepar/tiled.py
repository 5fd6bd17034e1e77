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


def run(x: torch.Tensor, grid: plan.Grid, run_tile: RunTile, comm: Comm) -> torch.Tensor | None:
    """Run every tile of ``x`` (``(..., H, W)``) on its owner; the merged result on rank 0."""
    owners = plan.assign(grid.weights(), comm.world)
    raw = {t: run_tile(tile_input(x, grid, t)) for t in range(grid.count) if owners[t] == comm.rank}
    if all(r == 0 for r in owners):
        return blend.merge([raw[t] for t in range(grid.count)], grid) if comm.rank == 0 else None
    # Holds for every grid whose cores follow the stride (plan.Axis.aligned), the only ones planned.
    assert grid.strips_suffice()
    return _merge_from_strips(raw, grid, owners, comm, _lead_shape(raw, comm))


def tile_input(x: torch.Tensor, grid: plan.Grid, t: int) -> torch.Tensor:
    """The input slice of tile ``t``."""
    i, j = grid.position(t)
    r, c = grid.rows, grid.cols
    return x[..., r.starts[i] : r.starts[i] + r.sizes[i], c.starts[j] : c.starts[j] + c.sizes[j]]


def _lead_shape(raw: dict[int, torch.Tensor], comm: Comm) -> tuple[int, ...]:
    """Leading (non-spatial) output dims, from rank 0's first tile (rank 0 always owns tile 0)."""
    mine = tuple(raw[0].shape[:-2]) if comm.rank == 0 else None
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
    lead: tuple[int, ...],
) -> torch.Tensor | None:
    like = next(iter(raw.values()), None)
    dtype = like.dtype if like is not None else None
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
    return _gather_cores(cores, grid, owners, comm, lead)


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
        i, j = grid.position(t)
        (_, h), (_, w) = grid.rows.span(i), grid.cols.span(j)
        target = out[..., grid.rows.offsets[i] : grid.rows.offsets[i] + h,
                     grid.cols.offsets[j] : grid.cols.offsets[j] + w]
        if owners[t] == 0:
            target.copy_(cores[t])
        elif h and w:
            buf = torch.empty((*lead, h, w), dtype=out.dtype, device=comm.device)
            recvs.append((owners[t], buf))
            places.append((target, buf))
    comm.exchange([], recvs)
    for target, buf in places:
        target.copy_(buf)
    return out
