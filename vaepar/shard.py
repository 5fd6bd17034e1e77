"""The ``shard`` and ``patch`` strategies: the input split into horizontal bands, one per rank.

``shard`` makes every layer see what it would see untiled: :func:`install` swaps the loaded
diffusers model's convolutions, GroupNorms and attention blocks for wrappers that, inside
:func:`sharding`, exchange halo rows with the neighbouring bands, merge GroupNorm statistics over
all bands (one collective per norm), and run attention with each band's queries over every band's
keys and values (diffusers' ``Attention``, Wan's per-frame and HunyuanVideo 1.5's frame-causal
attention) or over the gathered bands (other attention blocks).
Outside :func:`sharding` each wrapper calls the module it wraps, so the same model still runs
untiled (and tiled) bit for bit as before.

``patch`` runs the plain model on each band plus a margin of ``halo`` rows and keeps the core: no
communication while decoding, at the price of seams where the margin is too small.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from vaepar import plan
from vaepar.comm import Comm
from vaepar.families import ShardLeaves


@dataclass(kw_only=True, slots=True)
class Context:
    """This rank's band among ``active`` ranks (ranks ``0..active-1``) and its traffic."""

    comm: Comm
    index: int
    active: int
    group: object = None
    exchanges: int = 0
    bytes_sent: int = 0
    bytes_overlapped: int = 0
    reductions: int = 0
    gathers: int = 0

    @property
    def first(self) -> bool:
        """This band is the top one."""
        return self.index == 0

    @property
    def last(self) -> bool:
        """This band is the bottom one."""
        return self.index == self.active - 1

    def post_halos(self, x: torch.Tensor, top: int, bottom: int, *, overlapped: bool = True) -> Posted:
        """Start sending this band's edge rows and receiving the ``top`` rows of the band above and
        the ``bottom`` rows of the band below (zeros where there is no neighbour); the rows are
        there once :meth:`Posted.wait` returns. ``overlapped``: the caller computes meanwhile."""
        assert x.shape[-2] >= max(top, bottom), "a band is thinner than a convolution's halo"
        above = x.new_zeros((*x.shape[:-2], top, x.shape[-1]))
        below = x.new_zeros((*x.shape[:-2], bottom, x.shape[-1]))
        sends, recvs = [], []
        if not self.first:
            recvs += [(self.index - 1, above)] if top else []
            sends += [(self.index - 1, x[..., :bottom, :])] if bottom else []
        if not self.last:
            recvs += [(self.index + 1, below)] if bottom else []
            sends += [(self.index + 1, x[..., x.shape[-2] - top :, :])] if top else []
        sent = sum(t.numel() * t.element_size() for _, t in sends)
        self.exchanges += 1
        self.bytes_sent += sent
        self.bytes_overlapped += sent if overlapped else 0
        return Posted(self._transfer(sends, recvs), (above, below))

    def _transfer(self, sends: list[tuple[int, torch.Tensor]],
                  recvs: list[tuple[int, torch.Tensor]]) -> Callable[[], None]:
        """Start the halo transfers (band index, rows); returns their wait."""
        return self.comm.post(sends, recvs)

    def halos(self, x: torch.Tensor, top: int, bottom: int) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`post_halos`, waited for at once."""
        return self.post_halos(x, top, bottom, overlapped=False).wait()

    def exchange_rows(self, x: torch.Tensor, top: int, bottom: int, mode: str = "zeros") -> torch.Tensor:
        """``x`` with ``top`` rows of the band above and ``bottom`` rows of the band below (dim -2);
        at the global top and bottom edges, the rows ``F.pad`` adds in ``mode`` (zeros, replicate,
        reflect)."""
        if top == 0 and bottom == 0:
            return x
        above, below = self.edges(x, *self.halos(x, top, bottom), mode)
        return torch.cat([above, x, below], dim=-2)

    def edges(self, x: torch.Tensor, above: torch.Tensor, below: torch.Tensor,
              mode: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The halo rows received for band ``x``, with those past the global top and bottom edges
        (zeros as received) replaced by the rows ``F.pad`` adds in ``mode``."""
        top, bottom = above.shape[-2], below.shape[-2]
        first, last = self.first, self.last
        if mode != "zeros" and first and top:  # rows 1..top of the whole input: this band's, then the next's
            above = edge_rows(x if last else torch.cat([x[..., : top + 1, :], below], dim=-2), top, mode, at_top=True)
        if mode != "zeros" and last and bottom:
            below = edge_rows(x if first else torch.cat([above, x[..., -bottom - 1 :, :]], dim=-2), bottom, mode,
                              at_top=False)
        return above, below

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over the active ranks (in place)."""
        self.comm.all_reduce(t, self.group)
        self.reductions += 1
        return t

    def share(self, t: torch.Tensor) -> torch.Tensor:
        """Every active rank's ``t`` stacked in rank order, (active, *t.shape), on every rank: one
        all-reduce of slots each rank fills with its own ``t`` (exact: the other slots are zero)."""
        slots = t.new_zeros((self.active, *t.shape))
        slots[self.index] = t
        return self.all_reduce(slots)

    def gather_rows(self, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        """All bands concatenated along dim -2 on every active rank, and where this band starts."""
        rows = torch.tensor([x.shape[-2]], device=x.device)
        sizes = [int(c.item()) for c in self.comm.all_gather(rows, self.active, self.group)]
        padded = F.pad(x, (0, 0, 0, max(sizes) - x.shape[-2])).contiguous()
        parts = self.comm.all_gather(padded, self.active, self.group)
        self.gathers += 1
        full = torch.cat([p[..., :n, :] for p, n in zip(parts, sizes)], dim=-2)
        return full, sum(sizes[: self.index])


@dataclass(frozen=True, slots=True)
class Posted:
    """Halo rows on their way: ``wait`` returns (above, below) once they have arrived."""

    pending: Callable[[], None]
    rows: tuple[torch.Tensor, torch.Tensor]

    def wait(self) -> tuple[torch.Tensor, torch.Tensor]:
        self.pending()
        return self.rows


_current: Context | None = None


@contextmanager
def sharding(ctx: Context) -> Iterator[Context]:
    """Within this block, installed wrappers work on bands."""
    global _current
    _current, previous = ctx, _current
    try:
        yield ctx
    finally:
        _current = previous


class _Wrapper(nn.Module):
    """A stand-in that still answers for its original: ``wrapper.weight``, ``.processor``, ...
    reach the wrapped module, so code that inspects the model (pipelines checking an attention
    processor or a weight's dtype) works unchanged. ``wraps`` names the attribute holding it."""

    wraps: ClassVar[str]

    def __getattr__(self, name: str) -> object:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith("_") or name == self.wraps:  # private, or not built yet (copy, unpickle)
                raise
            return getattr(original(self), name)


class HaloConv2d(_Wrapper):
    """A 2-D convolution whose zero padding along H is replaced, between bands, by neighbours' rows.

    ``pad`` = (top, bottom) rows the convolution pads along H; ``inner`` is what to call when not
    sharding (the original module, or the original pad-then-convolve sequence).
    """

    wraps = "inner"

    def __init__(self, conv: nn.Conv2d, pad: tuple[int, int], inner: nn.Module, w_pad: tuple[int, int] = (0, 0)) -> None:
        super().__init__()
        self.conv, self.pad, self.inner, self.w_pad = conv, pad, inner, w_pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _current is None:
            return self.inner(x)
        c = self.conv
        if self._pads_evenly() and _overlappable(c, x, self.pad[0]):
            return _overlapped(self._convolve, x, self.pad[0], c.kernel_size[0])
        x = _current.exchange_rows(x, *self.pad)
        if self.w_pad != (0, 0):
            x = F.pad(x, self.w_pad)
        return self._convolve(x, 0)

    def _pads_evenly(self) -> bool:
        c = self.conv
        return (self.w_pad == (0, 0) and self.pad[0] == self.pad[1] == c.padding[0] > 0
                and c.padding_mode == "zeros" and c.stride == (1, 1) and c.dilation == (1, 1))

    def _convolve(self, x: torch.Tensor, rows: int) -> torch.Tensor:
        """The convolution with ``rows`` of zero padding along H (its own along W)."""
        c = self.conv
        return F.conv2d(x, c.weight, c.bias, c.stride, (rows, c.padding[1]), c.dilation, c.groups)


class HaloCausalConv3d(_Wrapper):
    """Wan's causal 3-D convolution: time cache per band, halo rows exchanged on the cache-extended
    input while the band's interior is convolved, zero padding only at the global edges."""

    wraps = "conv"

    def __init__(self, conv: nn.Module) -> None:
        super().__init__()
        self.conv = conv

    def forward(self, x: torch.Tensor, cache_x: torch.Tensor | None = None) -> torch.Tensor:
        if _current is None:
            return self.conv(x, cache_x)
        c = self.conv
        pw, _, top, bottom, front, _ = c._padding
        cache = cache_x.to(x.device) if cache_x is not None and front > 0 else None
        buf, sent = _time_padded(x, cache, pw, front)
        data = buf[..., sent, :, pw : buf.shape[-1] - pw]  # what the neighbours exchange
        if top == bottom and _overlappable(c, buf, top):
            return _overlapped(partial(_conv3d, c), buf, top, c.kernel_size[1], part=data,
                               embed=partial(_full_frames, buf, sent, pw))
        if top or bottom:
            above, below = _current.halos(data, top, bottom)
            buf = torch.cat([_full_frames(buf, sent, pw, above), buf, _full_frames(buf, sent, pw, below)], dim=-2)
        return _conv3d(c, buf, 0)


def _time_padded(x: torch.Tensor, cache: torch.Tensor | None, pw: int, front: int) -> tuple[torch.Tensor, slice]:
    """Zero front frames, the time cache, ``x`` and zero columns in one buffer (a single band-sized
    copy where concatenating and padding make two), and the frames that hold data (the ones
    neighbours exchange)."""
    tc = 0 if cache is None else cache.shape[2]
    assert tc <= front, "the time cache is longer than the causal padding"
    *lead, t, h, w = x.shape
    buf = x.new_zeros((*lead, front + t, h, w + 2 * pw))
    cols = slice(pw, pw + w)
    if cache is not None:
        buf[..., front - tc : front, :, cols] = cache
    buf[..., front:, :, cols] = x
    return buf, slice(front - tc, None)


def _full_frames(buf: torch.Tensor, sent: slice, pw: int, rows: torch.Tensor) -> torch.Tensor:
    """Halo ``rows`` of the exchanged frames and columns, placed in zeros shaped like ``buf``."""
    out = buf.new_zeros((*buf.shape[:-2], rows.shape[-2], buf.shape[-1]))
    out[..., sent, :, pw : buf.shape[-1] - pw] = rows
    return out


class HaloPaddedConv3d(_Wrapper):
    """A 3-D convolution that pads its own input before a plain ``conv`` (HunyuanVideo 1.5:
    ``time_causal_padding`` in ``F.pad`` order, edges replicated by ``pad_mode``): between bands the
    rows above and below are the neighbours', at the global top and bottom the pad mode's."""

    wraps = "inner"

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _current is None:
            return self.inner(x)
        m = self.inner
        left, right, top, bottom, front, back = m.time_causal_padding
        x = F.pad(x, (left, right, 0, 0, front, back), mode=m.pad_mode)
        if top == bottom and m.conv.padding == (0, 0, 0) and _overlappable(m.conv, x, top):
            return _overlapped(partial(_conv3d, m.conv), x, top, m.conv.kernel_size[1], mode=m.pad_mode)
        return m.conv(_current.exchange_rows(x, top, bottom, m.pad_mode))


class HaloEdgeFrameConv3d(_Wrapper):
    """LTX-2's 3-D convolution: edge frames repeated in time as the module does, then rows padded
    with the neighbours' between bands and by the conv's ``padding_mode`` (reflect in the decoder)
    at the global top and bottom."""

    wraps = "inner"

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor, causal: bool = True) -> torch.Tensor:
        if _current is None:
            return self.inner(x, causal=causal)
        m, c = self.inner, self.inner.conv
        k = m.kernel_size[0]
        front, back = (k - 1, 0) if causal else ((k - 1) // 2, (k - 1) // 2)
        x = torch.cat([x[:, :, :1].repeat(1, 1, front, 1, 1), x, x[:, :, -1:].repeat(1, 1, back, 1, 1)], dim=2)
        _, top, left = c.padding
        mode = c.padding_mode
        if left:
            x = F.pad(x, (left, left, 0, 0, 0, 0), mode="constant" if mode == "zeros" else mode)
        if _overlappable(c, x, top):
            return _overlapped(partial(_conv3d, c), x, top, c.kernel_size[1], mode=mode)
        return _conv3d(c, _current.exchange_rows(x, top, top, mode), 0)


def _overlappable(conv: nn.Conv2d | nn.Conv3d, x: torch.Tensor, p: int) -> bool:
    """Whether ``conv`` over band ``x`` padded by ``p`` rows at each end can take its halo after
    the fact (:func:`_overlapped`): a ``2p + 1``-row kernel, stride and dilation 1 along H, and a
    band of at least ``2p`` rows."""
    return (p > 0 and conv.kernel_size[-2] == 2 * p + 1 and conv.stride[-2] == 1 and conv.dilation[-2] == 1
            and x.shape[-2] >= 2 * p)


def _conv3d(conv: nn.Conv3d, x: torch.Tensor, rows: int) -> torch.Tensor:
    """``conv``'s weights over ``x`` (padded already in time and width) with ``rows`` of zero
    padding along H."""
    return F.conv3d(x, conv.weight, conv.bias, conv.stride, (0, rows, 0), conv.dilation, conv.groups)


def _overlapped(convolve: Callable[[torch.Tensor, int], torch.Tensor], x: torch.Tensor, p: int, k: int, *,
                mode: str = "zeros", part: torch.Tensor | None = None,
                embed: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """A ``k``-row convolution (``convolve(input, zero rows of H padding)``) over band ``x`` with
    ``p`` halo rows at each end, the exchange hidden behind it: the halo of ``x`` (or of ``part``,
    its rows ``embed`` places back into ``x``'s shape) travels while the band is convolved with
    zero rows; then the ``p`` output rows at each end are redone with the neighbours' rows (past
    the global edges: ``mode``'s), both ends in one call. No padded copy of the band is made. At a
    global edge padded with zeros the band's own convolution got the rows right: they are not redone."""
    posted = _current.post_halos(x if part is None else part, p, p)
    out = convolve(x, p)
    above, below = posted.wait()
    if embed is not None:
        above, below = embed(above), embed(below)
    above, below = _current.edges(x, above, below, mode)
    redo_top, redo_bottom = mode != "zeros" or not _current.first, mode != "zeros" or not _current.last
    inputs = []
    if redo_top:
        inputs.append(torch.cat([above, x[..., : k - 1, :]], dim=-2))
    if redo_bottom:
        inputs.append(torch.cat([x[..., x.shape[-2] - k + 1 :, :], below], dim=-2))
    if inputs:
        ends = convolve(torch.cat(inputs), 0).split(x.shape[0])
        if redo_top:
            out[..., :p, :] = ends[0]
        if redo_bottom:
            out[..., -p:, :] = ends[-1]
    return out


def edge_rows(x: torch.Tensor, n: int, mode: str, *, at_top: bool) -> torch.Tensor:
    """The ``n`` rows ``F.pad`` adds above (``at_top``) or below ``x`` in ``mode``."""
    h = x.shape[-2]
    if mode == "replicate":
        rows = [0] * n if at_top else [h - 1] * n
    elif mode == "reflect":
        assert h > n, "reflection needs more rows than it pads"
        rows = list(range(n, 0, -1)) if at_top else list(range(h - 2, h - 2 - n, -1))
    else:
        raise NotImplementedError(f"padding mode {mode}")
    return x[..., rows, :]


class ShardGroupNorm(_Wrapper):
    """GroupNorm with statistics over all bands, shared in one collective: :func:`group_norm`."""

    wraps = "norm"

    def __init__(self, norm: nn.GroupNorm) -> None:
        super().__init__()
        self.norm = norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _current is None:
            return self.norm(x)
        return group_norm(x, self.norm, _current)


CHUNK = 1 << 20
"""Elements per piece of a band that GroupNorm statistics are taken over on the CPU: two passes
over a piece that stays in cache (mean, then squared deviations) beat torch's one-pass Welford
reduction several times over. 4 MiB of float32 stays in a shared L3 cache and takes fewer calls
than 1 MiB pieces (SD-VAE 512² bands on 2 ranks: ~125 against ~190 ms per decode). Low-precision
pieces are cast to float32 one at a time, so a bfloat16 band is never copied whole."""

PIECES = 8
"""Off the CPU, low-precision bands are reduced and normalised in this many pieces, so float32
temporaries stay a fraction of the band."""


def group_norm(x: torch.Tensor, norm: nn.GroupNorm, ctx: Context) -> torch.Tensor:
    """``norm`` on this band with the statistics of all bands: every rank's per-group moments are
    shared in one collective and merged in rank order (the same result on every rank)."""
    stats = merge_moments(ctx.share(band_moments(x, norm.num_groups)), dim=0)
    return normalize(x, stats, norm)


def _channels_last(x: torch.Tensor) -> bool:
    """Channels vary fastest in memory (channels-last layouts, which CPU convolutions may choose)."""
    return x.ndim > 2 and x.stride(1) == 1 and x.shape[1] > 1 and not x.is_contiguous()


def band_moments(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Per (batch, group) of a band: [element count, mean, sum of squared deviations from that
    mean], shape (B, G, 3), accumulated in float32 (or ``x``'s dtype if wider), in either memory
    layout without copying the band: pieces of it are reduced and merged (Chan et al.)."""
    acc = torch.promote_types(x.dtype, torch.float32)
    b, c = x.shape[:2]
    last = _channels_last(x)
    rows = x.movedim(1, -1).reshape(b, -1, c) if last else x.reshape(b, c, -1)  # views
    dim = 1 if last else 2
    n = rows.shape[dim]
    if x.device.type == "cpu":
        size = max(1, CHUNK // (b * c))
    else:
        size = n if x.dtype == acc else -(-n // PIECES)
    parts = [_piece_moments(p.to(acc), groups, dim) for p in rows.split(size, dim)]
    return parts[0] if len(parts) == 1 else merge_moments(torch.stack(parts), dim=0)


def _piece_moments(p: torch.Tensor, groups: int, dim: int) -> torch.Tensor:
    """[count, mean, M2] per (batch, group) of a piece: (B, n, C) with ``dim`` 1, (B, C, n) with 2."""
    b, c = p.shape[0], p.shape[3 - dim]
    per = c // groups
    count = p.shape[dim] * per
    if p.device.type != "cpu":  # one fused reduction, no temporary
        grouped = p.unflatten(3 - dim, (groups, per))
        var, mean = torch.var_mean(grouped, dim=(dim, 3) if dim == 1 else (2, 3), correction=0)
        return torch.stack([torch.full_like(mean, count), mean, var * count], dim=-1)
    mean = p.sum(dim).reshape(b, groups, per).sum(-1) / count
    centre = mean.repeat_interleave(per, dim=1).unsqueeze(dim)
    m2 = (p - centre).square_().sum(dim).reshape(b, groups, per).sum(-1)
    return torch.stack([torch.full_like(mean, count), mean, m2], dim=-1)


def merge_moments(stats: torch.Tensor, dim: int) -> torch.Tensor:
    """The [count, mean, M2] of parts stacked along ``dim`` merged into those of their union (Chan
    et al.'s parallel formula): M2 = sum of the parts' M2 + sum of n_i (mean_i - mean)^2."""
    n, mean, m2 = stats.unbind(-1)
    total = n.sum(dim)
    merged = (n * mean).sum(dim) / total
    spread = (n * (mean - merged.unsqueeze(dim)).square()).sum(dim)
    return torch.stack([total, merged, m2.sum(dim) + spread], dim=-1)


def normalize(x: torch.Tensor, stats: torch.Tensor, norm: nn.GroupNorm) -> torch.Tensor:
    """Normalise with the merged (biased) statistics ``stats`` (B, G, 3) and apply the norm's
    affine transform: a single output tensor of ``x``'s dtype and memory layout, like the fused
    GroupNorm kernel. Each (sample, channel) is one channel of torch's batch-norm inference kernel,
    given its group's mean and variance (faster on CPU than a broadcast ``addcmul``); low precision:
    computed in float32 pieces."""
    b, c = x.shape[:2]
    n, mean, m2 = stats.unbind(-1)
    per = c // norm.num_groups
    mean, var = (t.repeat_interleave(per, dim=1) for t in (mean, m2 / n))  # (B, C): each channel its group's
    if x.dtype == mean.dtype and (b == 1 or x.is_contiguous()):
        affine = [t.to(mean.dtype).repeat(b) for t in (norm.weight, norm.bias)] if norm.affine else [None, None]
        out = F.batch_norm(x.reshape(1, b * c, *x.shape[2:]), mean.reshape(-1), var.reshape(-1), *affine, False,
                           0.0, norm.eps)
        return out.reshape(x.shape)
    scale = torch.rsqrt(var + norm.eps)
    shift = -mean * scale
    if norm.affine:
        weight = norm.weight.to(scale.dtype)
        scale, shift = scale * weight, shift * weight + norm.bias.to(scale.dtype)
    at = (b, c) + (1,) * (x.ndim - 2)
    scale, shift = scale.reshape(at), shift.reshape(at)
    if x.dtype == scale.dtype:
        return torch.addcmul(shift, x, scale)
    out = torch.empty_like(x)
    along = 2 + max(range(x.ndim - 2), key=lambda d: x.shape[2 + d])  # the longest spatial axis
    pieces = min(PIECES, x.shape[along])
    for src, dst in zip(x.tensor_split(pieces, dim=along), out.tensor_split(pieces, dim=along)):
        dst.copy_(torch.addcmul(shift, src.to(scale.dtype), scale))
    return out


class GatheredAttention(_Wrapper):
    """Attention over all bands: gather along H, run the original block, keep this band's rows."""

    wraps = "block"

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        if _current is None:
            return self.block(x, *args, **kwargs)
        full, start = _current.gather_rows(x)
        return self.block(full, *args, **kwargs)[..., start : start + x.shape[-2], :]


class QuerySplitAttention(GatheredAttention):
    """diffusers' ``Attention`` as the KL decoders use it, split by queries: :func:`split_attention`.
    A configuration it does not reproduce (:func:`splittable` false) runs as
    :class:`GatheredAttention`."""

    def forward(self, x: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        if _current is None or args or not splittable(self.block, x, kwargs):
            return super().forward(x, *args, **kwargs)
        return split_attention(self.block, x, _current)


def splittable(attn: nn.Module, x: torch.Tensor, kwargs: dict[str, object]) -> bool:
    """Whether ``attn(x, **kwargs)`` is the self-attention :func:`split_attention` reproduces:
    4-D input, no mask, context or spatial norm, no q/k norms, an optional plain GroupNorm, and
    processor ``AttnProcessor2_0`` or ``AttnProcessor`` (exactly those classes)."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    known = {"encoder_hidden_states", "attention_mask", "temb"}
    return (x.ndim == 4 and set(kwargs) <= known and all(v is None for v in kwargs.values())
            and type(attn.processor) in (AttnProcessor, AttnProcessor2_0)
            and attn.spatial_norm is None and not attn.is_cross_attention and attn.added_kv_proj_dim is None
            and attn.norm_q is None and attn.norm_k is None
            and (attn.group_norm is None or type(attn.group_norm) is nn.GroupNorm)
            and attn.to_q.in_features == attn.to_k.in_features == x.shape[1])


def split_attention(attn: nn.Module, x: torch.Tensor, ctx: Context) -> torch.Tensor:
    """The attention processor's arithmetic on this band's queries: GroupNorm with all bands'
    statistics, q, k, v of this band's rows, every band's keys and values gathered once, attention
    of this band's queries over all of them, output projection and residual on this band."""
    b, c, h, w = x.shape
    hidden = x.reshape(b, c, h * w)
    if attn.group_norm is not None:
        hidden = group_norm(hidden, attn.group_norm, ctx)
    hidden = hidden.transpose(1, 2)
    query, key, value = attn.to_q(hidden), attn.to_k(hidden), attn.to_v(hidden)
    kv, _ = ctx.gather_rows(torch.cat([key, value], dim=-1))  # (B, all tokens, k + v features)
    key, value = kv.split([key.shape[-1], value.shape[-1]], dim=-1)
    out = attn.to_out[1](attn.to_out[0](_attend(attn, query, key, value)))
    out = out.transpose(-1, -2).reshape(b, c, h, w)
    if attn.residual_connection:
        out = out + x
    return out / attn.rescale_output_factor


def _attend(attn: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Heads as the processor splits them; scaled-dot-product attention (``AttnProcessor2_0``) or
    diffusers' own scores and softmax (``AttnProcessor``)."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    if type(attn.processor) is not AttnProcessor2_0:
        q, k, v = (attn.head_to_batch_dim(t) for t in (query, key, value))
        return attn.batch_to_head_dim(torch.bmm(attn.get_attention_scores(q, k, None), v))
    b, heads = query.shape[0], attn.heads
    head_dim = key.shape[-1] // heads
    q, k, v = (t.reshape(b, -1, heads, head_dim).transpose(1, 2) for t in (query, key, value))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False)
    return out.transpose(1, 2).reshape(b, -1, heads * head_dim).to(q.dtype)


def split_frame_attention(block: nn.Module, x: torch.Tensor, ctx: Context) -> torch.Tensor:
    """The block's arithmetic on this band's queries: per-pixel norm and q, k, v of the band's
    rows, every band's keys and values gathered once (a frame's tokens are its rows in order), the
    band's queries attending over all of them, projection and residual on the band."""
    b, c, t, h, w = x.shape
    frames = block.norm(x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w))
    qkv = block.to_qkv(frames).reshape(b * t, 1, c * 3, -1).permute(0, 1, 3, 2).contiguous()
    q, k, v = qkv.chunk(3, dim=-1)
    kv, _ = ctx.gather_rows(torch.cat([k, v], dim=-1))  # (b*t, 1, all tokens, 2c)
    k, v = kv.split(c, dim=-1)
    out = F.scaled_dot_product_attention(q, k, v)
    out = block.proj(out.squeeze(1).permute(0, 2, 1).reshape(b * t, c, h, w))
    return out.view(b, t, c, h, w).permute(0, 2, 1, 3, 4) + x


def split_causal_attention(block: nn.Module, x: torch.Tensor, ctx: Context) -> torch.Tensor:
    """The block's arithmetic on this band's queries: per-pixel norm and q, k, v of the band's
    rows, every band's keys and values gathered once (all frames), each query attending to the
    pixels of its own frame and the frames before (the block's causal mask, built from frame
    indices), projection and residual on the band."""
    y = block.norm(x)
    q = block.to_q(y)
    kv, _ = ctx.gather_rows(torch.cat([block.to_k(y), block.to_v(y)], dim=1))  # (B, 2C, T, all rows, W)
    k, v = kv.chunk(2, dim=1)
    b, c, t, h, w = q.shape

    def tokens(z: torch.Tensor) -> torch.Tensor:  # (B, C, T, H, W) -> (B, 1, T*H*W, C), frame-major
        return z.reshape(b, c, -1).permute(0, 2, 1).unsqueeze(1)

    frame_of = torch.arange(t, device=x.device)
    mask = frame_of.repeat_interleave(h * w)[:, None] >= frame_of.repeat_interleave(k.shape[-2] * w)[None, :]
    out = F.scaled_dot_product_attention(tokens(q), tokens(k), tokens(v), attn_mask=mask)
    out = out.squeeze(1).reshape(b, t, h, w, c).permute(0, 4, 1, 2, 3)
    return block.proj_out(out) + x


class _VideoSplitAttention(GatheredAttention):
    """A video attention block (``(B, C, T, H, W)`` in and out) split by queries with ``split``;
    any other call runs gathered."""

    split: ClassVar[Callable[[nn.Module, torch.Tensor, Context], torch.Tensor]]

    def forward(self, x: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        if _current is None or args or kwargs or x.ndim != 5:
            return super().forward(x, *args, **kwargs)
        return type(self).split(self.block, x, _current)


class FrameSplitAttention(_VideoSplitAttention):
    """Per-frame attention of the ``frame_attention`` interface: :func:`split_frame_attention`."""

    split = staticmethod(split_frame_attention)


class CausalSplitAttention(_VideoSplitAttention):
    """Frame-causal attention of the ``causal_attention`` interface: :func:`split_causal_attention`."""

    split = staticmethod(split_causal_attention)


def install(model: nn.Module, leaves: ShardLeaves | None = None) -> int:
    """Swap the model's modules for band-aware wrappers, in place; returns how many were swapped.

    ``leaves``: the family's own modules to wrap (its ``shard_leaves()``; default: every family's).
    """
    from vaepar.families import all_shard_leaves

    leaves = leaves if leaves is not None else all_shard_leaves()
    blocks = leaves.attention + leaves.frame_attention + leaves.causal_attention
    inside_attention = {id(d) for m in model.modules() if isinstance(m, blocks) for d in m.modules()}
    swapped = 0
    for parent in list(model.modules()):
        if id(parent) in inside_attention or isinstance(parent, _Wrapper):
            continue
        for name, child in list(parent.named_children()):
            new = _wrap(child, leaves)
            if new is not None:
                setattr(parent, name, new)
                swapped += 1
    return swapped


def _wrap(m: nn.Module, leaves: ShardLeaves) -> nn.Module | None:
    from diffusers.models.downsampling import Downsample2D

    if isinstance(m, leaves.attention):
        return QuerySplitAttention(m) if _is_diffusers_attention(m) else GatheredAttention(m)
    if isinstance(m, leaves.frame_attention):
        return FrameSplitAttention(m)
    if isinstance(m, leaves.causal_attention):
        return CausalSplitAttention(m)
    if isinstance(m, leaves.causal_convs):  # 1x1x1: no padding, so no exchange and no buffer
        return HaloCausalConv3d(m) if any(m._padding) else None
    if isinstance(m, leaves.padded_convs):
        return HaloPaddedConv3d(m) if any(m.time_causal_padding) else None
    if isinstance(m, leaves.edge_frame_convs):
        return HaloEdgeFrameConv3d(m)
    if isinstance(m, nn.GroupNorm):
        return ShardGroupNorm(m)
    if isinstance(m, Downsample2D) and m.use_conv and m.padding == 0 and m.norm is None:
        return _ShardDownsample(m)
    if _is_pad_then_stride2(m):  # Wan: Sequential(ZeroPad2d((0, 1, 0, 1)), Conv2d(stride 2))
        return HaloConv2d(m[1], (0, 1), inner=m, w_pad=(0, 1))
    if isinstance(m, nn.Conv2d) and m.stride[0] == 1 and isinstance(m.padding, tuple) and m.kernel_size[0] > 1:
        return HaloConv2d(m, (m.padding[0], m.kernel_size[0] - 1 - m.padding[0]), inner=m)
    return None


def _is_diffusers_attention(m: nn.Module) -> bool:
    from diffusers.models.attention_processor import Attention

    return isinstance(m, Attention)


def _is_pad_then_stride2(m: nn.Module) -> bool:
    return (isinstance(m, nn.Sequential) and len(m) == 2 and isinstance(m[0], nn.ZeroPad2d)
            and tuple(m[0].padding) == (0, 1, 0, 1) and isinstance(m[1], nn.Conv2d) and m[1].stride == (2, 2))


class _ShardDownsample(_Wrapper):
    """diffusers' Downsample2D with ``padding=0``: pads (0, 1, 0, 1), then a stride-2 convolution."""

    wraps = "down"

    def __init__(self, down: nn.Module) -> None:
        super().__init__()
        self.down = down
        self.halo = HaloConv2d(down.conv, (0, 1), inner=down, w_pad=(0, 1))

    def forward(self, x: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        return self.down(x, *args, **kwargs) if _current is None else self.halo(x)


def unhandled(model: nn.Module) -> list[str]:
    """Modules outside every wrapper that mix rows (convolutions taller than one row or striding
    over rows, GroupNorm): ``shard`` would compute them on bands without their neighbours' rows."""
    wrapped = {id(m) for w in model.modules() if isinstance(w, _Wrapper) for m in w.modules()}
    found = []
    for name, m in model.named_modules():
        if id(m) in wrapped:
            continue
        mixes = isinstance(m, nn.GroupNorm) or (isinstance(m, (nn.Conv2d, nn.Conv3d))
                                                and (m.kernel_size[-2] > 1 or m.stride[-2] > 1))
        if mixes:
            found.append(f"{name} ({type(m).__name__})")
    return found


def original(wrapper: _Wrapper) -> nn.Module:
    """The module a wrapper stands in for."""
    return getattr(wrapper, wrapper.wraps)


def uninstall(model: nn.Module) -> int:
    """Put back the modules :func:`install` swapped, in place; returns how many."""
    restored = 0
    for parent in list(model.modules()):
        if isinstance(parent, _Wrapper):
            continue
        for name, child in list(parent.named_children()):
            if isinstance(child, _Wrapper):
                setattr(parent, name, original(child))
                restored += 1
    return restored


@dataclass(kw_only=True, slots=True)
class BandStats:
    """What one rank did in a banded run (for --verbose)."""

    band: tuple[int, int] = (0, 0)
    exchanges: int = 0
    bytes_sent: int = 0
    reductions: int = 0
    gathers: int = 0


def run(x: torch.Tensor, units: int, unit_in: int, unit_out_of: Callable[[int], int],
        fn: Callable[[torch.Tensor], torch.Tensor], comm: Comm, *, halo: int | None = None,
        groups: dict[int, object] | None = None, share: bool = False,
        finish: Callable[[list[torch.Tensor]], list[torch.Tensor]] | None = None,
        ) -> tuple[torch.Tensor | None, BandStats]:
    """Run ``fn`` on this rank's band of ``x``; rank 0 (every rank if ``share``) returns all bands'
    outputs joined along H.

    ``x`` has ``units * unit_in`` rows; a band of ``u`` units yields ``unit_out_of(u)`` output rows.
    ``halo`` None: shard (exchange inside every layer); an int: patch with that many units of margin.
    ``finish`` (:data:`vaepar.tiled.Finish`): applied to each rank's band output (none on an idle
    rank) before the join, which then moves the bands in its dtype.
    """
    bands = plan.bands(units, comm.world)
    stats = BandStats()
    out = None
    if comm.rank < len(bands):
        a, b = bands[comm.rank]
        stats.band = (a * unit_in, b * unit_in)
        if halo is None:
            out = _shard_band(x, a, b, unit_in, fn, comm, len(bands), stats, groups)
        else:
            lo, hi = plan.widened(bands, halo, units)[comm.rank]
            full = fn(x[..., lo * unit_in : hi * unit_in, :])
            start = unit_out_of(a - lo)
            out = full[..., start : start + unit_out_of(b - a), :]
    elif comm.world > 1 and halo is None:
        _group(comm, len(bands), groups)  # new_group is collective over all ranks
    if finish is not None:
        out = next(iter(finish([] if out is None else [out])), None)
    rows = [unit_out_of(b - a) for a, b in bands]
    return (_share_bands(out, rows, comm) if share else _gather_bands(out, rows, comm)), stats


def _shard_band(x: torch.Tensor, a: int, b: int, unit_in: int, fn: Callable[[torch.Tensor], torch.Tensor],
                comm: Comm, active: int, stats: BandStats, groups: dict[int, object] | None) -> torch.Tensor:
    ctx = Context(comm=comm, index=comm.rank, active=active, group=_group(comm, active, groups))
    band = x[..., a * unit_in : b * unit_in, :]
    if active == 1:
        return fn(band)
    with sharding(ctx):
        out = fn(band)
    stats.exchanges, stats.bytes_sent = ctx.exchanges, ctx.bytes_sent
    stats.reductions, stats.gathers = ctx.reductions, ctx.gathers
    return out


def _group(comm: Comm, active: int, groups: dict[int, object] | None) -> object:
    """The process group of ranks ``0..active-1`` (the comm's own group when all are active),
    made once per size."""
    if comm.world == 1 or active == comm.world:
        return comm.group
    assert comm.group is None, "a sub-group of a caller's group would need every process of the world"
    cache = groups if groups is not None else {}
    if active not in cache:
        cache[active] = dist.new_group(list(range(active)))
    return cache[active]


def _share_bands(out: torch.Tensor | None, rows: list[int], comm: Comm) -> torch.Tensor:
    """Every rank receives every band's output rows: one broadcast per band, nothing padded."""
    lead, width, dtype = comm.broadcast_object((tuple(out.shape[:-2]), out.shape[-1], out.dtype)
                                               if comm.rank == 0 and out is not None else None)
    # contiguous: a broadcast moves memory in storage order (a channels-last band would arrive scrambled)
    parts = [out.contiguous() if r == comm.rank and out is not None
             else torch.empty((*lead, n, width), dtype=dtype, device=comm.device) for r, n in enumerate(rows)]
    for r, part in enumerate(parts):
        comm.broadcast_from(r, part)
    return torch.cat(parts, dim=-2)


def _gather_bands(out: torch.Tensor | None, rows: list[int], comm: Comm) -> torch.Tensor | None:
    """Rank 0 receives every band's output rows and joins them; the others send theirs."""
    if comm.rank != 0:
        if out is not None:
            comm.exchange([(0, out)], [])
        return None
    assert out is not None
    parts = [out] + [torch.empty((*out.shape[:-2], n, out.shape[-1]), dtype=out.dtype, device=out.device)
                     for n in rows[1:]]
    comm.exchange([], [(r, parts[r]) for r in range(1, len(rows))])
    return torch.cat(parts, dim=-2)
