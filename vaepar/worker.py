"""The worker: joins the group, loads the VAE once, then runs a stream of jobs.

Every rank runs :func:`main`. Rank 0 reads each input and broadcasts it, every rank runs its
share of the tiles (:mod:`vaepar.tiled`), rank 0 assembles and writes the output and returns the
reports. A :class:`Worker` outlives its jobs so that a server can feed it more.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from vaepar import latents, outputs, plan, tiled
from vaepar.comm import Comm
from vaepar.errors import VaeparError
from vaepar.latents import Factors
from vaepar.report import JobReport, MemoryMeter, RankStats, Stopwatch, Ticker
from vaepar.vae import Family, ModelSpec, decode_grid, default_tile, load

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
    """Decode one latent file into ``output``."""

    source: Path
    output: Path
    height: int | None = None
    width: int | None = None


def decode_plan(cfg: WorkerConfig, shape: tuple[int, ...]) -> tuple[str, plan.Grid]:
    """The strategy and tile grid for a latent of ``shape``, the same on every rank.

    ``auto`` picks ``tiled`` when the latent is larger than one tile, else ``none``.
    """
    h, w = shape[-2], shape[-1]
    tile = cfg.tile_size or default_tile(cfg.model)
    strategy = cfg.strategy
    if strategy == "auto":
        strategy = "tiled" if max(h, w) > tile // cfg.model.scale else "none"
    grid = decode_grid(cfg.model, h, w, tile if strategy == "tiled" else None, cfg.tile_overlap)
    if not (grid.rows.aligned() and grid.cols.aligned()):
        raise VaeparError(
            f"tile size {tile} with overlap {cfg.tile_overlap} puts tile cores out of step with the "
            "tile stride (diffusers would return a wrongly sized image); pick an overlap that makes "
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
        z = self.comm.broadcast(self._read(job) if self.comm.rank == 0 else None)
        strategy, grid = decode_plan(self.cfg, z.shape)
        frames = z.shape[2] if z.ndim == 5 else 1
        self.jobs_started += 1
        ticker = Ticker(self.comm, f"job{self.jobs_started}", grid.count * frames, job.source.name,
                        self.cfg.show_progress)
        self.meter.start()
        stats = RankStats(rank=self.comm.rank, device=str(self.comm.device))
        busy = Stopwatch()

        def run_tile(zt: torch.Tensor) -> torch.Tensor:
            stats.tiles += 1
            return self.family.decode_tile(zt, tiled=grid.tiled, tick=ticker.tick)

        try:
            out = tiled.run(z, grid, run_tile, self.comm)
        finally:
            ticker.close()
        stats.busy_s, stats.peak_mem_bytes = busy.elapsed(), self.meter.peak()
        everyone = self.comm.gather_objects(stats)
        if self.comm.rank != 0:
            return None
        assert out is not None
        sample = self.family.finish_decode(out)
        written = outputs.write_sample(job.output, sample, fps=self.cfg.fps, quality=self.cfg.quality)
        return JobReport(input=str(job.source), outputs=[str(p) for p in written],
                         input_shape=list(z.shape), output_shape=list(sample.shape), strategy=strategy,
                         tiles=grid.count, seconds=clock.elapsed(), ranks=everyone)

    def _read(self, job: DecodeJob) -> torch.Tensor:
        z = latents.load(job.source, self.cfg.model, height=job.height, width=job.width).tensor
        z = z.to(self.comm.device, self.dtype)
        return self.cfg.factors.unscale(z) if self.cfg.factors is not None else z

    def close(self) -> None:
        self.comm.close()


def main(cfg: WorkerConfig, jobs: list[DecodeJob]) -> list[JobReport] | None:
    """Entry point of every rank: run ``jobs`` in order; rank 0 returns their reports."""
    worker = Worker(cfg)
    try:
        reports = [worker.decode(job) for job in jobs]
    finally:
        worker.close()
    return None if worker.comm.rank != 0 else [r for r in reports if r is not None]
