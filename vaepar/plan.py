"""Tile geometry and the tile scheduler: pure arithmetic, identical on every rank.

A tiled decode (or encode) cuts the input along H and W into overlapping tiles, runs the VAE on
each, blends every tile into its upper and left neighbour and keeps a cropped core of it. The
geometry of one axis is an :class:`Axis`; a :class:`Grid` is the product of two axes. Nothing here
touches torch or torch.distributed, so every rank computes the same plan without talking.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate


@dataclass(frozen=True, kw_only=True, slots=True)
class Axis:
    """The tiling of one spatial axis.

    Tile ``k`` reads input ``[starts[k], starts[k] + sizes[k])`` and yields ``out_sizes[k]`` output
    elements. Neighbours blend over ``blend`` output elements (less where a tile is smaller), each
    tile keeps its first ``crop`` outputs (all of them when ``crop`` is None), and the concatenated
    cores are clipped to ``limit`` (no clip when None).
    """

    starts: tuple[int, ...]
    sizes: tuple[int, ...]
    out_sizes: tuple[int, ...]
    blend: int
    crop: int | None = None
    limit: int | None = None

    def __post_init__(self) -> None:
        if not self.starts or len({len(self.starts), len(self.sizes), len(self.out_sizes)}) != 1:
            raise ValueError("an axis needs one start, size and output size per tile")
        if self.blend < 0 or any(s <= 0 for s in self.sizes + self.out_sizes):
            raise ValueError("tile sizes must be positive and the blend extent non-negative")

    @property
    def count(self) -> int:
        return len(self.starts)

    def extent(self, k: int) -> int:
        """Blend extent between tile ``k - 1`` and tile ``k``, as diffusers' ``blend_v/h``."""
        assert 0 < k < self.count
        return min(self.out_sizes[k - 1], self.out_sizes[k], self.blend)

    def keep(self, k: int) -> int:
        """How many leading outputs of tile ``k`` reach the result, before the final clip."""
        return self.out_sizes[k] if self.crop is None else min(self.crop, self.out_sizes[k])

    @property
    def offsets(self) -> tuple[int, ...]:
        """Where each tile's kept core starts in the result."""
        return tuple(accumulate((self.keep(k) for k in range(self.count - 1)), initial=0))

    @property
    def length(self) -> int:
        """Length of the assembled result along this axis."""
        total = self.offsets[-1] + self.keep(self.count - 1)
        return total if self.limit is None else min(total, self.limit)

    def span(self, k: int) -> tuple[int, int]:
        """The part ``[a, b)`` of tile ``k``'s output that lands in the result (maybe empty)."""
        offset = self.offsets[k]
        return 0, max(0, min(self.keep(k), self.length - offset))

    def aligned(self) -> bool:
        """True when every kept core ends where the next tile's input starts (scaled to output).

        Otherwise the assembled result repeats or skips content: diffusers then returns an image
        of the wrong size, which vaepar refuses to reproduce.
        """
        return all(
            self.offsets[k] * self.sizes[0] == self.starts[k] * self.out_sizes[0]
            for k in range(1, self.count)
        )

    def strips_suffice(self) -> bool:
        """True when a tile's blend never reaches the part it hands on to its next neighbour.

        Then the final value of a tile's trailing strip depends only on raw (unblended) data, and
        ranks can reproduce diffusers' serial, in-place merge from their neighbours' raw strips.
        """
        for k in range(1, self.count - 1):
            if self.extent(k) + self.extent(k + 1) > self.out_sizes[k]:
                return False
        return True


def single(n: int, out: int) -> Axis:
    """An axis that is not tiled: one tile over the whole input, kept whole."""
    return Axis(starts=(0,), sizes=(n,), out_sizes=(out,), blend=0)


def tiled_axis(
    n: int, *, tile: int, stride: int, up: int, down: int, blend: int,
    crop: int | None, limit: int | None = None,
) -> Axis:
    """Tiles at ``range(0, n, stride)`` of ``tile`` inputs (edge tiles shorter), as diffusers does.

    A tile of ``s`` inputs yields ``s * up // down`` outputs (decoders upsample, encoders floor).
    """
    if stride <= 0 or tile <= 0:
        raise ValueError(f"tile ({tile}) and stride ({stride}) must be positive")
    starts = tuple(range(0, n, stride))
    sizes = tuple(min(tile, n - s) for s in starts)
    outs = tuple(s * up // down for s in sizes)
    return Axis(starts=starts, sizes=sizes, out_sizes=outs, blend=blend, crop=crop, limit=limit)


@dataclass(frozen=True, kw_only=True, slots=True)
class Grid:
    """Tiles over (H, W), numbered in scan order: tile ``t`` is row ``t // cols``, col ``t % cols``."""

    rows: Axis
    cols: Axis

    @property
    def count(self) -> int:
        return self.rows.count * self.cols.count

    @property
    def tiled(self) -> bool:
        return self.count > 1 or self.rows.crop is not None or self.cols.crop is not None

    def position(self, t: int) -> tuple[int, int]:
        return divmod(t, self.cols.count)

    def index(self, i: int, j: int) -> int:
        return i * self.cols.count + j

    def weights(self) -> tuple[int, ...]:
        """Work per tile: its input area."""
        return tuple(h * w for h in self.rows.sizes for w in self.cols.sizes)

    def strips_suffice(self) -> bool:
        return self.rows.strips_suffice() and self.cols.strips_suffice()

    def amplification(self) -> float:
        """Input area processed (overlaps included) over the input area."""
        area = (self.rows.starts[-1] + self.rows.sizes[-1]) * (self.cols.starts[-1] + self.cols.sizes[-1])
        return sum(self.weights()) / area


def kl_decode_grid(h: int, w: int, *, tile: int, overlap: float, scale: int) -> Grid:
    """diffusers ``AutoencoderKL.tiled_decode``: latent tiles of ``tile // scale``, sample blend."""
    lat = tile // scale
    if h <= lat and w <= lat:
        return Grid(rows=single(h, h * scale), cols=single(w, w * scale))
    stride, blend = int(lat * (1 - overlap)), int(tile * overlap)
    ax = dict(tile=lat, stride=stride, up=scale, down=1, blend=blend, crop=tile - blend)
    return Grid(rows=tiled_axis(h, **ax), cols=tiled_axis(w, **ax))


def kl_encode_grid(h: int, w: int, *, tile: int, overlap: float, scale: int) -> Grid:
    """diffusers ``AutoencoderKL._tiled_encode``: pixel tiles of ``tile``, latent blend."""
    if h <= tile and w <= tile:
        return Grid(rows=single(h, h // scale), cols=single(w, w // scale))
    lat = tile // scale
    stride, blend = int(tile * (1 - overlap)), int(lat * overlap)
    ax = dict(tile=tile, stride=stride, up=1, down=scale, blend=blend, crop=lat - blend)
    return Grid(rows=tiled_axis(h, **ax), cols=tiled_axis(w, **ax))


def assign(weights: tuple[int, ...], nranks: int) -> tuple[int, ...]:
    """Owner rank of each tile: contiguous runs in scan order minimising the heaviest load, then
    levelled by moving or swapping single tiles between the heaviest and the lightest rank while
    that lowers the heavier of the two (the merge swaps strips between any owners, so runs need
    not stay whole).

    Every rank gets at least one tile when there are enough tiles; ranks beyond the tile count
    idle; tile 0 stays on rank 0. Deterministic: the same weights and rank count give the same
    plan everywhere.
    """
    if nranks < 1:
        raise ValueError(f"need at least one rank, got {nranks}")
    if not weights:
        return ()
    cap = _min_cap(weights, min(nranks, len(weights)))
    cuts = _pack(weights, cap)
    while len(cuts) < min(nranks, len(weights)):
        cuts = _split_heaviest(weights, cuts)
    owners: list[int] = []
    for rank, (a, b) in enumerate(zip(cuts, cuts[1:] + [len(weights)])):
        owners += [rank] * (b - a)
    return _level(weights, owners, len(cuts))


def _level(weights: tuple[int, ...], owners: list[int], used: int) -> tuple[int, ...]:
    """Move or swap one tile at a time from the heaviest to the lightest of ``used`` ranks while
    the pair's heavier load drops (a sum of squares that only falls, so it ends). Ties go to
    moves over swaps, then to the tile nearest the light rank's own (fewer strips to send)."""
    while True:
        load = loads(weights, tuple(owners), used)
        heavy, light = load.index(max(load)), load.index(min(load))
        mine = [t for t, r in enumerate(owners) if r == heavy]
        theirs = [t for t, r in enumerate(owners) if r == light]
        givers = [t for t in mine if t != 0]
        options = [(u, t) for t in givers for u in ([None] if len(mine) > 1 else []) + theirs]
        best = min(((max(load[heavy] - d, load[light] + d), u is not None, min(abs(t - v) for v in theirs), t, u)
                    for u, t in options if (d := weights[t] - (weights[u] if u is not None else 0)) > 0),
                   default=None, key=lambda c: c[:4])
        if best is None or best[0] >= load[heavy]:
            return tuple(owners)
        *_, t, u = best
        owners[t] = light
        if u is not None:
            owners[u] = heavy


def _pack(weights: tuple[int, ...], cap: int) -> list[int]:
    """Greedy run starts: fill each run up to ``cap``."""
    cuts, load = [0], 0
    for t, w in enumerate(weights):
        if load + w > cap and load > 0:
            cuts.append(t)
            load = 0
        load += w
    return cuts


def _min_cap(weights: tuple[int, ...], parts: int) -> int:
    lo, hi = max(weights), sum(weights)
    while lo < hi:
        mid = (lo + hi) // 2
        if len(_pack(weights, mid)) <= parts:
            hi = mid
        else:
            lo = mid + 1
    return lo


def _split_heaviest(weights: tuple[int, ...], cuts: list[int]) -> list[int]:
    """Split the heaviest splittable run at its most even point (first such run on ties)."""
    ends = cuts[1:] + [len(weights)]
    runs = [(a, b) for a, b in zip(cuts, ends) if b - a > 1]
    a, b = max(runs, key=lambda r: (sum(weights[r[0]:r[1]]), -r[0]))
    total = sum(weights[a:b])
    best = min(range(a + 1, b), key=lambda m: (abs(total - 2 * sum(weights[a:m])), m))
    return sorted(cuts + [best])


def loads(weights: tuple[int, ...], owners: tuple[int, ...], nranks: int) -> list[int]:
    """Total weight per rank."""
    out = [0] * nranks
    for w, r in zip(weights, owners):
        out[r] += w
    return out


def widened(bands: list[tuple[int, int]], margin: int, units: int) -> list[tuple[int, int]]:
    """Each band with ``margin`` units more above and below, clipped to ``0..units`` (what ``patch``
    runs the model on)."""
    return [(max(0, a - margin), min(units, b + margin)) for a, b in bands]


def bands(units: int, nranks: int) -> list[tuple[int, int]]:
    """Split ``units`` rows (latent rows, or pixel rows in steps of the model's scale) into
    contiguous, uneven bands, one per active rank: at most ``nranks``, never empty.

    With fewer units than ranks only the first ``units`` ranks get a band; every rank computes
    the same split.
    """
    if units < 1 or nranks < 1:
        raise ValueError(f"need at least one row and one rank, got {units} rows and {nranks} ranks")
    k = min(units, nranks)
    base, extra = divmod(units, k)
    sizes = [base + (1 if r < extra else 0) for r in range(k)]
    starts = list(accumulate(sizes, initial=0))
    return list(zip(starts, starts[1:]))
