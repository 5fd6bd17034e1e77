"""The tile grid and the scheduler: pure arithmetic, no processes."""

from __future__ import annotations

import itertools

import pytest

from vaepar import plan


def brute_force_best(weights: tuple[int, ...], k: int) -> int:
    """Smallest possible heaviest load over all contiguous splits into at most k runs."""
    n, best = len(weights), sum(weights)
    for m in range(1, min(k, n) + 1):
        for cuts in itertools.combinations(range(1, n), m - 1):
            bounds = (0, *cuts, n)
            best = min(best, max(sum(weights[a:b]) for a, b in zip(bounds, bounds[1:])))
    return best


def brute_force_any(weights: tuple[int, ...], k: int) -> int:
    """Smallest possible heaviest load over every assignment of tiles to k ranks."""
    return min(max(sum(w for w, r in zip(weights, owners) if r == rank) for rank in range(k))
               for owners in itertools.product(range(k), repeat=len(weights)))


@pytest.mark.parametrize("weights", [
    (4, 4, 4, 4), (16, 16, 16, 4, 16, 16, 16, 4, 4, 4, 4, 1), (9, 1, 1, 1, 9, 1, 1, 1),
    (5, 3, 8, 2, 7, 1, 1, 6, 4), (1,), (3, 3),
])
@pytest.mark.parametrize("nranks", [1, 2, 3, 4, 5])
def test_assign_beats_the_best_contiguous_split_and_uses_every_rank(weights: tuple[int, ...], nranks: int) -> None:
    owners = plan.assign(weights, nranks)
    assert len(owners) == len(weights) and owners[0] == 0
    heaviest = max(plan.loads(weights, owners, nranks))
    assert heaviest <= brute_force_best(weights, nranks)
    assert heaviest >= max(max(weights), -(-sum(weights) // nranks))
    assert set(owners) == set(range(min(nranks, len(weights)))), "every rank works while tiles last"


def test_assign_levels_the_sd_512_grid_to_the_optimum() -> None:
    """diffusers' 3x3 grid of a 512-pixel SD image in 256-pixel tiles: no contiguous split of 2
    ranks does better than 3584 of 6400; moving one edge tile reaches the best of all 512
    assignments."""
    weights = plan.kl_decode_grid(64, 64, tile=256, overlap=0.25, scale=8).weights()
    assert weights == (1024, 1024, 512, 1024, 1024, 512, 512, 512, 256)
    assert brute_force_best(weights, 2) == 3584
    owners = plan.assign(weights, 2)
    assert max(plan.loads(weights, owners, 2)) == brute_force_any(weights, 2) == 3328


@pytest.mark.parametrize("nranks", [2, 3, 4])
def test_assign_is_close_to_the_best_of_all_assignments(nranks: int) -> None:
    weights = (5, 3, 8, 2, 7, 1, 1, 6)
    heaviest = max(plan.loads(weights, plan.assign(weights, nranks), nranks))
    assert heaviest <= brute_force_any(weights, nranks) + min(weights)


def test_assign_is_deterministic() -> None:
    weights = tuple((7 * i) % 5 + 1 for i in range(40))
    assert len({plan.assign(weights, 6) for _ in range(5)}) == 1


def test_more_ranks_than_tiles_leaves_the_rest_idle() -> None:
    owners = plan.assign((4, 2, 4), 8)
    assert owners == (0, 1, 2)
    assert plan.loads((4, 2, 4), owners, 8)[3:] == [0] * 5


def test_assign_rejects_zero_ranks() -> None:
    with pytest.raises(ValueError):
        plan.assign((1, 2), 0)


def diffusers_decode_tiles(h: int, w: int, tile: int, overlap: float, scale: int) -> list[tuple[int, int, int, int]]:
    """Tile input boxes as diffusers' AutoencoderKL.tiled_decode loops over them."""
    lat = tile // scale
    step = int(lat * (1 - overlap))
    return [(i, min(i + lat, h), j, min(j + lat, w)) for i in range(0, h, step) for j in range(0, w, step)]


@pytest.mark.parametrize("h,w", [(19, 23), (8, 40), (64, 64), (17, 9)])
def test_kl_decode_grid_matches_diffusers_loops(h: int, w: int) -> None:
    grid = plan.kl_decode_grid(h, w, tile=32, overlap=0.25, scale=4)
    boxes = []
    for t in range(grid.count):
        i, j = grid.position(t)
        r, c = grid.rows, grid.cols
        boxes.append((r.starts[i], r.starts[i] + r.sizes[i], c.starts[j], c.starts[j] + c.sizes[j]))
    assert boxes == diffusers_decode_tiles(h, w, 32, 0.25, 4)
    assert (grid.rows.length, grid.cols.length) == (h * 4, w * 4)
    assert grid.rows.blend == 8 and grid.rows.crop == 24
    assert grid.rows.aligned() and grid.cols.aligned()


def test_small_latent_is_one_untiled_tile() -> None:
    grid = plan.kl_decode_grid(7, 8, tile=32, overlap=0.25, scale=4)
    assert grid.count == 1 and not grid.tiled
    assert (grid.rows.length, grid.cols.length) == (28, 32)


def test_misaligned_overlap_is_detected() -> None:
    # 64 px tiles at scale 8 with overlap 0.3: stride 5 latents (40 px) but cores of 45 px
    grid = plan.kl_decode_grid(40, 40, tile=64, overlap=0.3, scale=8)
    assert not grid.rows.aligned()


def test_encode_grid_mirrors_decode() -> None:
    grid = plan.kl_encode_grid(100, 72, tile=32, overlap=0.25, scale=4)
    assert grid.rows.starts == tuple(range(0, 100, 24))
    assert grid.rows.out_sizes[0] == 8 and grid.rows.blend == 2 and grid.rows.crop == 6
    assert (grid.rows.length, grid.cols.length) == (25, 18)


def test_strips_suffice_only_when_blends_stay_apart() -> None:
    ok = plan.Axis(starts=(0, 6, 12), sizes=(8, 8, 4), out_sizes=(32, 32, 16), blend=8, crop=24)
    tight = plan.Axis(starts=(0, 6, 12), sizes=(8, 8, 4), out_sizes=(32, 12, 16), blend=8, crop=24)
    assert ok.strips_suffice() and not tight.strips_suffice()
    assert ok.extent(2) == 8 and tight.extent(1) == 8


def test_axis_spans_clip_to_limit() -> None:
    ax = plan.tiled_axis(10, tile=4, stride=3, up=8, down=1, blend=8, crop=24, limit=80)
    assert ax.offsets == (0, 24, 48, 72)
    assert [ax.span(k) for k in range(ax.count)] == [(0, 24), (0, 24), (0, 24), (0, 8)]
    assert ax.length == 80


def test_amplification_counts_overlap() -> None:
    grid = plan.kl_decode_grid(32, 32, tile=32, overlap=0.25, scale=4)
    assert grid.amplification() == pytest.approx(sum(grid.weights()) / (32 * 32))
    assert grid.amplification() > 1


@pytest.mark.parametrize("tile,overlap", [(32, 0.25), (64, 0.4375), (32, 0.375), (64, 0.125), (32, 0.0)])
def test_every_aligned_grid_merges_from_strips(tile: int, overlap: float) -> None:
    """tiled.run relies on this: a planned (aligned) grid never needs more than raw strips."""
    for h in range(1, 70, 3):
        grid = plan.kl_decode_grid(h, 50, tile=tile, overlap=overlap, scale=4)
        if grid.rows.aligned() and grid.cols.aligned():
            assert grid.strips_suffice(), (h, tile, overlap)


def test_input_rows_cover_what_each_rank_reads() -> None:
    """The rows each rank is sent (engine.input_rows): its band, patch's margin, its tiles' rows."""
    from vaepar import engine
    from vaepar.vae import architecture

    spec = architecture("sd-vae")  # scale 8, no patchifying
    grid = plan.kl_decode_grid(64, 64, tile=256, overlap=0.25, scale=8)
    one = plan.Grid(rows=plan.single(10, 80), cols=plan.single(16, 128))
    assert engine.input_rows(spec, "decode", "shard", one, 10, 3) == [(0, 4), (4, 7), (7, 10)]
    assert engine.input_rows(spec, "decode", "patch", one, 10, 3, halo=2) == [(0, 6), (2, 9), (5, 10)]
    assert engine.input_rows(spec, "encode", "shard", one, 80, 2) == [(0, 40), (40, 80)]  # pixel rows, 8 per latent
    assert engine.input_rows(spec, "decode", "shard", one, 2, 4) == [(0, 1), (1, 2), (0, 0), (0, 0)]
    assert engine.input_rows(spec, "decode", "none", one, 10, 2) == [(0, 10), (0, 0)]
    # tiles of 32 latents at stride 24 (rows 0:32, 24:56, 48:64); rank 0 owns tiles 0, 1 and 3
    assert plan.assign(grid.weights(), 2) == (0, 0, 1, 0, 1, 1, 1, 1, 1)
    assert engine.input_rows(spec, "decode", "tiled", grid, 64, 2) == [(0, 56), (0, 64)]
