"""Blending of decoded (or encoded) tiles, exactly as diffusers merges them.

diffusers blends tile ``(i, j)`` in place with its already-merged upper neighbour (over rows),
then with its already-merged left neighbour (over columns), in scan order, and keeps the tile's
leading core. :func:`merge` replays that serially. :func:`finish_tile` gives the same values for
one tile from raw strips of its three neighbours (up, left, up-left), which is what lets ranks
merge their own tiles without holding anyone else's. Tensors are ``(..., H, W)``; no
communication happens here.
"""

from __future__ import annotations

import torch

from vaepar.plan import Grid


def blend_rows(a: torch.Tensor, b: torch.Tensor, extent: int) -> torch.Tensor:
    """Blend the last rows of ``a`` into the first rows of ``b``, in place on ``b`` (``blend_v``)."""
    e = min(a.shape[-2], b.shape[-2], extent)
    for y in range(e):
        b[..., y, :] = a[..., -e + y, :] * (1 - y / e) + b[..., y, :] * (y / e)
    return b


def blend_cols(a: torch.Tensor, b: torch.Tensor, extent: int) -> torch.Tensor:
    """Blend the last columns of ``a`` into the first columns of ``b``, in place (``blend_h``)."""
    e = min(a.shape[-1], b.shape[-1], extent)
    for x in range(e):
        b[..., x] = a[..., -e + x] * (1 - x / e) + b[..., x] * (x / e)
    return b


def merge(tiles: list[torch.Tensor], grid: Grid) -> torch.Tensor:
    """Assemble raw tiles (scan order) as diffusers' serial tiled decode/encode does.

    Mutates ``tiles`` in place, as diffusers does.
    """
    rows, cols = grid.rows, grid.cols
    for t, tile in enumerate(tiles):
        i, j = grid.position(t)
        if i > 0:
            blend_rows(tiles[grid.index(i - 1, j)], tile, rows.blend)
        if j > 0:
            blend_cols(tiles[grid.index(i, j - 1)], tile, cols.blend)
    cores = [
        torch.cat([core(tiles[grid.index(i, j)], grid, i, j) for j in range(cols.count)], dim=-1)
        for i in range(rows.count)
    ]
    return torch.cat(cores, dim=-2)


def core(tile: torch.Tensor, grid: Grid, i: int, j: int) -> torch.Tensor:
    """The part of merged tile ``(i, j)`` that lands in the result."""
    (r0, r1), (c0, c1) = grid.rows.span(i), grid.cols.span(j)
    return tile[..., r0:r1, c0:c1]


def finish_tile(
    raw: torch.Tensor,
    up: torch.Tensor | None,
    left: torch.Tensor | None,
    corner: torch.Tensor | None,
) -> torch.Tensor:
    """Merged value of one tile from raw strips of its neighbours (valid when strips suffice).

    ``up``: the upper tile's last rows (as many as the vertical blend extent), ``left``: the left
    tile's last columns, ``corner``: the up-left tile's last rows x last columns. The upper strip's
    leading columns were blended with the corner before the upper tile's merge finished; the left
    strip's leading rows likewise. Blending is elementwise, so replaying it on strips reproduces
    the serial result bit for bit. Mutates ``raw``.
    """
    if up is not None:
        if corner is not None:
            up = blend_cols(corner, up.clone(), corner.shape[-1])
        blend_rows(up, raw, up.shape[-2])
    if left is not None:
        if corner is not None:
            left = blend_rows(corner, left.clone(), corner.shape[-2])
        blend_cols(left, raw, left.shape[-1])
    return raw
