"""``vaepar bench``: strategies x worker counts, measured (time, memory, speedup, error) or planned.

Measuring starts one worker group per worker count and runs every strategy inside it
(:class:`vaepar.worker.BenchJob`); the untiled reference runs first, alone, in a group of one.
Planning (``--plan``) runs nothing: it asks the real scheduler and band planner, and runs the real
(shard-wrapped) model on the meta device to count halo traffic and activation sizes.
"""

from __future__ import annotations

import platform
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from vaepar import launch, plan, shard, worker
from vaepar.errors import OptionError, VaeparError
from vaepar.families import Family
from vaepar.vae import ModelSpec

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


@dataclass(frozen=True, kw_only=True, slots=True)
class BenchConfig:
    """One benchmark: a model, an input shape, strategies and worker counts."""

    cfg: worker.WorkerConfig
    task: str
    shape: tuple[int, ...]
    counts: tuple[int, ...]
    strategies: tuple[str, ...]
    repeats: int = 3
    warmup: int = 1

    def __post_init__(self) -> None:
        if self.task not in ("decode", "encode"):
            raise OptionError(f"--task must be decode or encode, got {self.task!r}")
        if not self.counts or min(self.counts) < 1:
            raise OptionError(f"worker counts must be positive, got {list(self.counts)}")
        bad = [s for s in self.strategies if s not in worker.STRATEGIES or s == "auto"]
        if not self.strategies or bad:
            raise OptionError(f"unknown strategies {bad}; choose from none, tiled, shard, patch")
        if self.repeats < 1 or self.warmup < 0:
            raise OptionError("--repeats must be at least 1 and --warmup at least 0")

    @property
    def latent_shape(self) -> tuple[int, ...]:
        if self.task == "decode":
            return self.shape
        s = self.cfg.model.scale
        *lead, h, w = self.shape
        frames = [1 + (lead[2] - 1) // 4] if len(lead) == 3 else []
        return (lead[0], self.cfg.model.latent_channels, *frames, h // s, w // s)


def input_shape(spec: ModelSpec, task: str, resolution: tuple[int, int], frames: int | None, batch: int) -> tuple[int, ...]:
    """The bench input: latents for decode, pixels for encode, of an image/video of that size."""
    h, w = resolution
    s = spec.scale
    if h % s or w % s:
        raise VaeparError(f"--resolution {h}x{w} is not a multiple of the model's scale ({s})")
    if spec.is_video != (frames is not None):
        raise VaeparError("--frames needs a video model, and a video model needs --frames"
                          if frames is None else "--frames needs a video model (Wan)")
    if frames is not None and (frames < 1 or (frames - 1) % 4):
        raise VaeparError(f"--frames must be 1 + 4k (1, 5, 9, ..., 81), got {frames}")
    time = [frames] if frames is not None else []
    if task == "encode":
        return (batch, 3, *time, h, w)
    latent_time = [1 + (frames - 1) // 4] if frames is not None else []
    return (batch, spec.latent_channels, *latent_time, h // s, w // s)


def device_name(device: str) -> str:
    """The machine, in words, for tables and JSON."""
    if device == "cuda":
        return f"{torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return f"cpu: {cpu}, {launch.default_threads(1)} cores"


def measure(bench: BenchConfig) -> dict[str, Any]:
    """Run the benchmark; the JSON document described in the README."""
    with tempfile.TemporaryDirectory(prefix="vaepar-bench-") as tmp:
        reference = Path(tmp) / "reference.safetensors"
        ref_note = _reference(bench, reference)
        results: list[worker.BenchResult] = []
        for n in bench.counts:
            jobs = [worker.BenchJob(task=bench.task, strategy=s, shape=bench.shape, repeats=bench.repeats,
                                    warmup=bench.warmup, reference=reference) for s in bench.strategies]
            try:
                results += launch.run(launch.LaunchSpec(nproc=n), worker.main, _for(bench.cfg, n), jobs)
            except VaeparError as exc:
                results += [_failed(s, n, str(exc)) for s in bench.strategies]
    return _document(bench, results, ref_note)


def _for(cfg: worker.WorkerConfig, nproc: int) -> worker.WorkerConfig:
    """The configuration for ``nproc`` workers: the given CPU threads per worker, else cores // workers."""
    threads = (cfg.threads or launch.default_threads(nproc)) if cfg.device == "cpu" else None
    return replace(cfg, threads=threads, show_progress=False)


def _reference(bench: BenchConfig, path: Path) -> str:
    job = worker.BenchJob(task=bench.task, strategy="none", shape=bench.shape, repeats=1, warmup=0,
                          reference=path, write_reference=True)
    try:
        launch.run(launch.LaunchSpec(nproc=1), worker.main, _for(bench.cfg, 1), [job])
    except VaeparError as exc:
        return f"untiled single-worker reference could not run ({exc}); max_abs_err is null"
    return ""


def _failed(strategy: str, nproc: int, note: str) -> worker.BenchResult:
    return worker.BenchResult(strategy=strategy, nproc=nproc, seconds=None, times=[], ranks=[], parts=0,
                              work=0.0, note=note)


def _document(bench: BenchConfig, results: list[worker.BenchResult], ref_note: str) -> dict[str, Any]:
    first = {}
    for r in sorted(results, key=lambda r: r.nproc):
        if r.seconds is not None:
            first.setdefault(r.strategy, r)
    runs = []
    for r in results:
        base = first.get(r.strategy)
        speedup = base.seconds / r.seconds if base is not None and r.seconds else None
        runs.append({
            "strategy": r.strategy, "nproc": r.nproc, "seconds": r.seconds,
            "peak_mem_bytes": max((s.peak_mem_bytes for s in r.ranks), default=None),
            "speedup": speedup,
            "efficiency": speedup / (r.nproc / base.nproc) if speedup is not None else None,
            "max_abs_err": r.max_abs_err, "work": r.work,
            "per_rank_peak_mem_bytes": [s.peak_mem_bytes for s in r.ranks], "parts": r.parts,
            "times": r.times, "note": r.note,
        })
    spec = bench.cfg.model
    notes = [n for n in (ref_note,) if n]
    if spec.random_weights:
        notes.append("random weights: timing does not depend on the weights")
    if bench.cfg.device == "cuda" and bench.cfg.backend == "gloo":
        notes.append("--backend gloo: ranks may share a GPU and stage transfers through host memory; per-rank "
                     "memory is meaningful, times are not a scaling figure")
    return {"device": device_name(bench.cfg.device), "model": spec.name, "task": bench.task,
            "latent_shape": list(bench.latent_shape), "input_shape": list(bench.shape),
            "dtype": bench.cfg.dtype, "repeats": bench.repeats, "warmup": bench.warmup,
            "threads_per_worker": bench.cfg.threads if bench.cfg.device == "cpu" else None,
            "backend": bench.cfg.backend or ("nccl" if bench.cfg.device == "cuda" else "gloo"), "runs": runs,
            "notes": notes}


# -- planning ----------------------------------------------------------------------------------


class _Counting(shard.Context):
    """A shard context that moves nothing: counts what its band would send."""

    __slots__ = ("scale_rows",)

    def _transfer(self, sends: list[tuple[int, torch.Tensor]],
                  recvs: list[tuple[int, torch.Tensor]]) -> Callable[[], None]:
        return lambda: None

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        self.reductions += 1
        return t

    def gather_rows(self, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        self.gathers += 1
        full = round(x.shape[-2] * self.scale_rows)
        return x.new_zeros((*x.shape[:-2], full, x.shape[-1])), 0


def _meta_family(spec: ModelSpec, dtype: torch.dtype) -> Family:
    import diffusers

    with torch.device("meta"):
        vae = getattr(diffusers, spec.class_name).from_config(spec.config)
    if dtype != torch.float32:
        vae = vae.to(dtype)
    shard.install(vae, spec.family.shard_leaves())
    return spec.family(vae.eval(), spec)


@dataclass(kw_only=True, slots=True)
class MetaRun:
    """What one run on the meta device shows: the activation peak, the attention work, the output."""

    peak: int
    attention_flops: int
    out: torch.Tensor


ATTENTION_OPS = ("bmm", "scaled_dot_product")
"""Ops that count as attention: scores and weighted values (projections are linear layers)."""


def _meta_run(family: Family, task: str, x: torch.Tensor, ctx: shard.Context | None) -> MetaRun:
    """One run on the meta device: the largest (inputs + output) bytes of any module, and the
    floating-point operations of attention (torch's own flop counter)."""
    from torch.utils.flop_counter import FlopCounterMode

    peak = [0]

    def hook(_: torch.nn.Module, args: tuple[Any, ...], out: Any) -> None:
        size = sum(a.numel() * a.element_size() for a in args if isinstance(a, torch.Tensor))
        if isinstance(out, torch.Tensor):
            size += out.numel() * out.element_size()
        peak[0] = max(peak[0], size)

    handles = [m.register_forward_hook(hook) for m in family.vae.modules()]
    fn = family.decode_tile if task == "decode" else family.encode_tile
    try:
        with torch.inference_mode(), FlopCounterMode(display=False) as flops:
            if ctx is None:
                out = fn(x, tiled=False)
            else:
                with shard.sharding(ctx):
                    out = fn(x, tiled=False)
    finally:
        for h in handles:
            h.remove()
    counts = flops.get_flop_counts().get("Global", {})
    attention = sum(v for op, v in counts.items() if any(name in str(op) for name in ATTENTION_OPS))
    return MetaRun(peak=peak[0], attention_flops=attention, out=out)


def plan_rows(bench: BenchConfig) -> list[dict[str, Any]]:
    """Predicted imbalance, work, bytes sent per rank and activation memory, without computing."""
    cfg = bench.cfg
    dtype = worker.DTYPES[cfg.dtype]
    family = _meta_family(cfg.model, dtype)
    x = torch.empty(bench.shape, device="meta", dtype=dtype)
    if bench.task == "encode":
        x = family.prepare_encode(x)
    steps = family.steps(x, bench.task)
    if x.ndim == 5 and steps > 1:  # frame-by-frame models: run the first steps, scale traffic to all of them
        x = x[:, :, : min(x.shape[2], 5 if bench.task == "encode" else 2)]
    scale = steps / family.steps(x, bench.task)
    rows = worker.latent_rows(cfg.model, bench.task, x.shape[-2])
    unit_in = 1 if bench.task == "decode" else cfg.model.scale // cfg.model.patch_size
    out = []
    for strategy in bench.strategies:
        for n in bench.counts:
            row = _plan_one(family, bench, strategy, n, x, rows, unit_in)
            row["bytes_sent_per_rank"] = round(row["bytes_sent_per_rank"] * scale)
            row["exchanges"] = round(row["exchanges"] * scale)
            row["bytes_overlapped_per_rank"] = round(row["bytes_overlapped_per_rank"] * scale)
            row["attention_flops_per_rank"] = round(row["attention_flops_per_rank"] * scale)
            out.append({"strategy": strategy, "nproc": n, **row})
    return out


def _plan_one(family: Family, bench: BenchConfig, strategy: str, n: int, x: torch.Tensor, rows: int,
              unit_in: int) -> dict[str, Any]:
    cfg = replace(bench.cfg, strategy=strategy)
    _, grid = worker.plan_job(cfg, bench.task, tuple(x.shape), n)
    if strategy in ("none", "tiled"):
        return _plan_tiles(family, bench.task, x, grid, n if strategy == "tiled" else 1, n)
    bands = plan.bands(rows, n)
    sizes = [b - a for a, b in bands]
    if strategy == "patch":
        spans = plan.widened(bands, cfg.halo, rows)
        big = max(spans, key=lambda s: s[1] - s[0])
        run = _meta_run(family, bench.task, x[..., big[0] * unit_in : big[1] * unit_in, :], None)
        loads = [b - a for a, b in spans]
        return {"imbalance": max(loads) / (sum(sizes) / n), "work": sum(loads) / rows,
                "bytes_sent_per_rank": _out_bytes(run.out, max(sizes), big[1] - big[0]) if len(bands) > 1 else 0,
                "activation_bytes_per_rank": run.peak, "attention_flops_per_rank": run.attention_flops,
                "exchanges": 0, "bytes_overlapped_per_rank": 0}
    index = 1 if len(bands) > 2 else 0
    a, b = bands[index]
    ctx = _Counting(comm=None, index=index, active=len(bands))  # type: ignore[arg-type]
    ctx.scale_rows = rows / (b - a)
    run = _meta_run(family, bench.task, x[..., a * unit_in : b * unit_in, :], ctx if len(bands) > 1 else None)
    return {"imbalance": max(sizes) / (sum(sizes) / n), "work": 1.0,
            "bytes_sent_per_rank": ctx.bytes_sent + (run.out.numel() * run.out.element_size() if len(bands) > 1 else 0),
            "activation_bytes_per_rank": run.peak, "attention_flops_per_rank": run.attention_flops,
            "exchanges": ctx.exchanges, "bytes_overlapped_per_rank": ctx.bytes_overlapped}


def _plan_tiles(family: Family, task: str, x: torch.Tensor, grid: plan.Grid, ranks: int, n: int) -> dict[str, Any]:
    from vaepar.tiled import tile_input

    weights = grid.weights()
    owners = plan.assign(weights, ranks)
    loads = plan.loads(weights, owners, n)
    big = max(range(grid.count), key=lambda t: weights[t])
    by_shape: dict[tuple[int, ...], MetaRun] = {}  # tiles of one shape run alike
    runs: dict[int, MetaRun] = {}
    for t in range(grid.count):
        part = tile_input(x, grid, t)
        if tuple(part.shape) not in by_shape:
            by_shape[tuple(part.shape)] = _meta_run(family, task, part, None)
        runs[t] = by_shape[tuple(part.shape)]
    y = runs[big].out
    attention = [0] * n
    for t, run in runs.items():
        attention[owners[t]] += run.attention_flops
    per_elem = y.numel() // (y.shape[-2] * y.shape[-1])
    sent = [0] * n
    for t in range(grid.count):
        i, j = grid.position(t)
        if owners[t] != 0:
            (_, h), (_, w) = grid.rows.span(i), grid.cols.span(j)
            sent[owners[t]] += h * w
        for u, kind in ((grid.index(i + 1, j), "rows") if i + 1 < grid.rows.count else (None, ""),
                        (grid.index(i, j + 1), "cols") if j + 1 < grid.cols.count else (None, "")):
            if u is not None and owners[u] != owners[t]:
                e = grid.rows.extent(i + 1) if kind == "rows" else grid.cols.extent(j + 1)
                sent[owners[t]] += e * (grid.cols.out_sizes[j] if kind == "rows" else grid.rows.out_sizes[i])
    return {"imbalance": max(loads) / (sum(loads) / n), "work": grid.amplification(),
            "bytes_sent_per_rank": max(sent) * per_elem * y.element_size(),
            "activation_bytes_per_rank": runs[big].peak, "attention_flops_per_rank": max(attention),
            "exchanges": 0, "bytes_overlapped_per_rank": 0}


def _out_bytes(y: torch.Tensor, core: int, span: int) -> int:
    return y.numel() * y.element_size() * core // span

