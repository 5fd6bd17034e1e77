"""Blending equals diffusers' serial, in-place merge, bit for bit; no processes."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKL, AutoencoderKLWan

from vaepar import blend, plan


@pytest.mark.parametrize("extent", [0, 1, 5, 8, 40])
def test_blend_rows_and_cols_equal_diffusers(extent: int) -> None:
    g = torch.Generator().manual_seed(extent)
    a, b = torch.randn(2, 3, 12, 10, generator=g), torch.randn(2, 3, 9, 10, generator=g)
    ours, theirs = b.clone(), b.clone()
    out = blend.blend_rows(a, ours, extent)
    AutoencoderKL.blend_v(None, a, theirs, extent)
    assert out is ours, "blends in place and returns the blended tensor"
    assert torch.equal(ours, theirs)
    b2 = torch.randn(2, 3, 12, 7, generator=g)
    ours, theirs = b2.clone(), b2.clone()
    blend.blend_cols(a, ours, extent)
    AutoencoderKL.blend_h(None, a, theirs, extent)
    assert torch.equal(ours, theirs)


def test_blend_on_video_tiles_equals_wan() -> None:
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(1, 3, 2, 8, 9, generator=g), torch.randn(1, 3, 2, 8, 9, generator=g)
    ours, theirs = b.clone(), b.clone()
    blend.blend_rows(a, ours, 4)
    blend.blend_cols(a, ours, 3)
    AutoencoderKLWan.blend_v(None, a, theirs, 4)
    AutoencoderKLWan.blend_h(None, a, theirs, 3)
    assert torch.equal(ours, theirs)


def diffusers_merge(tiles: list[list[torch.Tensor]], blend_extent: int, row_limit: int) -> torch.Tensor:
    """The merge loop of diffusers' AutoencoderKL.tiled_decode, on given tiles."""
    result_rows = []
    for i, row in enumerate(tiles):
        result_row = []
        for j, tile in enumerate(row):
            if i > 0:
                tile = AutoencoderKL.blend_v(None, tiles[i - 1][j], tile, blend_extent)
            if j > 0:
                tile = AutoencoderKL.blend_h(None, row[j - 1], tile, blend_extent)
            result_row.append(tile[:, :, :row_limit, :row_limit])
        result_rows.append(torch.cat(result_row, dim=3))
    return torch.cat(result_rows, dim=2)


def random_tiles(grid: plan.Grid, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 3, grid.rows.out_sizes[i], grid.cols.out_sizes[j], generator=g)
            for i in range(grid.rows.count) for j in range(grid.cols.count)]


@pytest.mark.parametrize("h,w", [(19, 23), (8, 40), (24, 24), (17, 9)])
def test_merge_equals_diffusers_including_in_place_order(h: int, w: int) -> None:
    grid = plan.kl_decode_grid(h, w, tile=32, overlap=0.25, scale=4)
    tiles = random_tiles(grid, h * w)
    nested = [[tiles[grid.index(i, j)].clone() for j in range(grid.cols.count)] for i in range(grid.rows.count)]
    expected = diffusers_merge(nested, grid.rows.blend, grid.rows.crop)
    assert torch.equal(blend.merge(tiles, grid), expected)
    # in place, as diffusers: later tiles were blended with already-blended neighbours
    assert all(torch.equal(t, n) for t, n in zip(tiles, (x for row in nested for x in row)))


@pytest.mark.parametrize("h,w,tile,overlap", [(19, 23, 32, 0.25), (30, 14, 32, 0.25), (40, 33, 64, 0.125),
                                              (21, 21, 32, 0.0)])
def test_finish_tile_from_strips_equals_serial_merge(h: int, w: int, tile: int, overlap: float) -> None:
    grid = plan.kl_decode_grid(h, w, tile=tile, overlap=overlap, scale=4)
    assert grid.strips_suffice()
    tiles = random_tiles(grid, 7)
    raw = [t.clone() for t in tiles]
    merged = blend.merge(tiles, grid)
    for t in range(grid.count):
        i, j = grid.position(t)
        ev = grid.rows.extent(i) if i else 0
        eh = grid.cols.extent(j) if j else 0
        up = last(raw[grid.index(i - 1, j)], ev, None) if i else None
        left = last(raw[grid.index(i, j - 1)], None, eh) if j else None
        corner = last(raw[grid.index(i - 1, j - 1)], ev, eh) if i and j else None
        core = blend.core(blend.finish_tile(raw[t].clone(), up, left, corner), grid, i, j)
        r0, c0 = grid.rows.offsets[i], grid.cols.offsets[j]
        expected = merged[..., r0 : r0 + core.shape[-2], c0 : c0 + core.shape[-1]]
        assert torch.equal(core, expected), f"tile {t}"


def last(x: torch.Tensor, rows: int | None, cols: int | None) -> torch.Tensor:
    """The trailing ``rows`` rows and ``cols`` columns of ``x`` (None: all)."""
    h, w = x.shape[-2:]
    return x[..., h - (h if rows is None else rows) :, w - (w if cols is None else cols) :]
