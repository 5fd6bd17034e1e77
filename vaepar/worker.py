"""The worker: joins the group, loads the VAE once, then runs a stream of jobs.

Every rank runs :func:`main`. Rank 0 reads each input and broadcasts it, every rank runs its
share of the tiles (:mod:`vaepar.tiled`), rank 0 assembles and writes the output and returns the
reports. A :class:`Worker` outlives its jobs so that a server can feed it more.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from vaepar import latents, outputs, pixels, plan, tiled
from vaepar.comm import Comm
from vaepar.errors import VaeparError
from vaepar.latents import Factors
from vaepar.report import JobReport, MemoryMeter, RankStats, Stopwatch, Ticker
from vaepar.vae import Family, ModelSpec, decode_grid, default_tile, encode_grid, load

STRATEGIES = ("auto", "none", "tiled")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True, kw_only=True, slots=True)
class WorkerConfig:
    """What every worker needs to know, the same on all ranks."""

    model: ModelSpec
    device: str = "cpu"
    dtype: str = "float32"
    threads: int | None = None
    strategy: str = "auto"
    tile_size: int | None = None
    tile_overlap: float = 0.25
    factors: Factors | None = None
    fps: int = 16
    quality: int = 8
    sample: bool = False
    seed: int | None = None
    show_progress: bool = True

    def __post_init__(self) -> None:
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"--device must be cpu or cuda, got {self.device!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"unknown --strategy {self.strategy!r}; choose from {', '.join(STRATEGIES)}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"--threads must be at least 1, got {self.threads}")
        if not 0 <= self.tile_overlap < 0.5:
            raise ValueError(f"--tile-overlap must be in [0, 0.5), got {self.tile_overlap}")
        if self.tile_size is not None and (self.tile_size <= 0 or self.tile_size % self.model.scale):
            raise ValueError(f"--tile-size must be a positive multiple of the model's scale "
                             f"({self.model.scale}), got {self.tile_size}")
        if self.fps < 1:
            raise ValueError(f"--fps must be at least 1, got {self.fps}")
        if not 0 <= self.quality <= 10:
            raise ValueError(f"--quality must be in [0, 10], got {self.quality}")


@dataclass(frozen=True, kw_only=True, slots=True)
class DecodeJob:
    """Decode one latent file into ``output``; ``scaled``: the file holds pipeline-scaled latents."""

    source: Path
    output: Path
    height: int | None = None
    width: int | None = None
    scaled: bool = True


@dataclass(frozen=True, kw_only=True, slots=True)
class EncodeJob:
    """Encode one image, video or pixel tensor into a latent file ``output``."""

    source: Path
    output: Path
    frames: int | None = None
    fit: str | None = None
    model_ref: str = ""


def plan_job(cfg: WorkerConfig, task: str, shape: tuple[int, ...]) -> tuple[str, plan.Grid]:
    """The strategy and tile grid for an input of ``shape``, the same on every rank.

    ``shape`` is the latent's (decode) or the pixels' as the encoder's tiles slice them (encode).
    ``auto`` picks ``tiled`` when the input is larger than one tile (diffusers' own test), else
    ``none``.
    """
    h, w = shape[-2], shape[-1]
    tile = cfg.tile_size or default_tile(cfg.model)
    make = decode_grid if task == "decode" else encode_grid
    grid = make(cfg.model, h, w, tile, cfg.tile_overlap)
    strategy = cfg.strategy
    if strategy == "auto":
        strategy = "tiled" if grid.tiled else "none"
    if strategy == "none":
        return strategy, make(cfg.model, h, w, None, cfg.tile_overlap)
    if not (grid.rows.aligned() and grid.cols.aligned()):
        raise VaeparError(
            f"tile size {tile} with overlap {cfg.tile_overlap} puts tile cores out of step with the "
            "tile stride (diffusers would return a wrongly sized result); pick an overlap that makes "
            "tile * overlap a multiple of the model's scale")
    return strategy, grid


class Worker:
    """One rank: its place in the group and its copy of the VAE."""

    def __init__(self, cfg: WorkerConfig) -> None:
        self.cfg = cfg
        self.comm = Comm.join(cfg.device)
        if cfg.threads is not None and cfg.device == "cpu":
            torch.set_num_threads(cfg.threads)
        self.dtype = DTYPES[cfg.dtype]
        self.family = Family.of(load(cfg.model, self.comm.device, self.dtype), cfg.model)
        self.meter = MemoryMeter(self.comm.device)
        self.jobs_started = 0

    @torch.inference_mode()
    def decode(self, job: DecodeJob) -> JobReport | None:
        """Decode one file; rank 0 writes the output and returns the report."""
        clock = Stopwatch()
        z = self.comm.broadcast(self._read_latents(job) if self.comm.rank == 0 else None)
        strategy, grid = plan_job(self.cfg, "decode", tuple(z.shape))
        out, ranks = self._run(z, grid, self.family.decode_tile, self.family.steps(z, "decode"), job.source.name)
        if out is None:
            return None
        sample = self.family.finish_decode(out)
        written = outputs.write_sample(job.output, sample, fps=self.cfg.fps, quality=self.cfg.quality)
        return JobReport(input=str(job.source), outputs=[str(p) for p in written], input_shape=list(z.shape),
                         output_shape=list(sample.shape), strategy=strategy, tiles=grid.count,
                         seconds=clock.elapsed(), ranks=ranks)

    @torch.inference_mode()
    def encode(self, job: EncodeJob) -> JobReport | None:
        """Encode one file; rank 0 writes the latents and returns the report."""
        clock = Stopwatch()
        x, meta = self._read_pixels(job) if self.comm.rank == 0 else (None, {})
        x = self.comm.broadcast(x)
        strategy, grid = plan_job(self.cfg, "encode", tuple(x.shape))
        out, ranks = self._run(x, grid, self.family.encode_tile, self.family.steps(x, "encode"), job.source.name)
        if out is None:
            return None
        z = self.family.latents(out, sample=self.cfg.sample, seed=self.cfg.seed)
        if self.cfg.factors is not None:
            z = self.cfg.factors.scale(z)
        meta |= {"model": job.model_ref, "scaled": str(self.cfg.factors is not None).lower()}
        written = outputs.write_latents(job.output, z, meta)
        return JobReport(input=str(job.source), outputs=[str(written)], input_shape=pixel_shape(x, meta),
                         output_shape=list(z.shape), strategy=strategy, tiles=grid.count,
                         seconds=clock.elapsed(), ranks=ranks)

    def _run(self, x: torch.Tensor, grid: plan.Grid, tile_fn: Callable[..., torch.Tensor], steps: int,
             label: str) -> tuple[torch.Tensor | None, list[RankStats]]:
        """Every rank runs its tiles; rank 0 gets the merged result and everyone's stats."""
        self.jobs_started += 1
        ticker = Ticker(self.comm, f"job{self.jobs_started}", grid.count * steps, label, self.cfg.show_progress)
        self.meter.start()
        stats = RankStats(rank=self.comm.rank, device=str(self.comm.device))
        busy = Stopwatch()

        def run_tile(tile: torch.Tensor) -> torch.Tensor:
            stats.tiles += 1
            return tile_fn(tile, tiled=grid.tiled, tick=ticker.tick)

        try:
            out = tiled.run(x, grid, run_tile, self.comm)
        finally:
            ticker.close()
        stats.busy_s, stats.peak_mem_bytes = busy.elapsed(), self.meter.peak()
        return out, self.comm.gather_objects(stats)

    def _read_latents(self, job: DecodeJob) -> torch.Tensor:
        z = latents.load(job.source, self.cfg.model, height=job.height, width=job.width).tensor
        z = z.to(self.comm.device, self.dtype)
        return self.cfg.factors.unscale(z) if self.cfg.factors is not None and job.scaled else z

    def _read_pixels(self, job: EncodeJob) -> tuple[torch.Tensor, dict[str, str]]:
        x = pixels.prepare(job.source, self.cfg.model, frames=job.frames, how=job.fit)
        meta = {"height": str(x.shape[-2]), "width": str(x.shape[-1])}
        if x.ndim == 5:
            meta["frames"] = str(x.shape[2])
        return self.family.prepare_encode(x.to(self.comm.device, self.dtype)), meta

    def close(self) -> None:
        self.comm.close()


def pixel_shape(x: torch.Tensor, meta: dict[str, str]) -> list[int]:
    """Shape of the pixels before the encoder's preparation (patchifying)."""
    size = [int(meta["height"]), int(meta["width"])]
    return [x.shape[0], 3, *([int(meta["frames"])] if "frames" in meta else []), *size]


def main(cfg: WorkerConfig, jobs: list[DecodeJob | EncodeJob]) -> list[JobReport] | None:
    """Entry point of every rank: run ``jobs`` in order; rank 0 returns their reports."""
    worker = Worker(cfg)
    try:
        reports = [worker.decode(j) if isinstance(j, DecodeJob) else worker.encode(j) for j in jobs]
    finally:
        worker.close()
    return None if worker.comm.rank != 0 else [r for r in reports if r is not None]
