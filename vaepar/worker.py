"""The worker: joins the group, loads the VAE once, then runs a stream of jobs.

Every rank runs :func:`main`. Rank 0 reads each input and broadcasts it, every rank runs its
share of the tiles (:mod:`vaepar.tiled`), rank 0 assembles and writes the output and returns the
reports. For PNG and MP4 outputs each rank converts its own part to uint8 before the gather, and
rank 0 writes in the background (:mod:`vaepar.writer`) while the next input decodes. A
:class:`Worker` outlives its jobs so that a server can feed it more.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TypeVar

import torch

from vaepar import compat, engine, latents, outputs, pixels, plan, shard
from vaepar.engine import latent_rows
from vaepar.comm import Comm, backend_problem
from vaepar.errors import OptionError, VaeparError
from vaepar.latents import Factors
from vaepar.report import JobReport, MemoryMeter, RankStats, Stopwatch, Ticker
from vaepar.tiled import Finish
from vaepar.vae import ModelSpec, load
from vaepar.writer import Writer

T = TypeVar("T")
STRATEGIES = ("auto", "none", "tiled", "shard", "patch")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True, kw_only=True, slots=True)
class WorkerConfig:
    """What every worker needs to know, the same on all ranks."""

    model: ModelSpec
    device: str = "cpu"
    backend: str | None = None  # None: nccl on cuda, gloo on cpu
    dtype: str = "float32"
    threads: int | None = None
    strategy: str = "auto"
    tile_size: int | None = None
    tile_overlap: float | None = None
    factors: Factors | None = None
    fps: int = 16
    quality: int = 8
    sample: bool = False
    seed: int | None = None
    halo: int = 8
    show_progress: bool = True
    verbose: bool = False

    def __post_init__(self) -> None:
        if self.device not in ("cpu", "cuda"):
            raise OptionError(f"--device must be cpu or cuda, got {self.device!r}")
        if (problem := backend_problem(self.device, self.backend)) is not None:
            raise OptionError(problem)
        if self.dtype not in DTYPES:
            raise OptionError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.strategy not in STRATEGIES:
            raise OptionError(f"unknown --strategy {self.strategy!r}; choose from {', '.join(STRATEGIES)}")
        if self.threads is not None and self.threads < 1:
            raise OptionError(f"--threads must be at least 1, got {self.threads}")
        if self.tile_overlap is not None and not 0 <= self.tile_overlap < 0.5:
            raise OptionError(f"--tile-overlap must be in [0, 0.5), got {self.tile_overlap}")
        if self.tile_size is not None and (self.tile_size <= 0 or self.tile_size % self.model.scale):
            raise OptionError(f"--tile-size must be a positive multiple of the model's scale "
                             f"({self.model.scale}), got {self.tile_size}")
        if self.fps < 1:
            raise OptionError(f"--fps must be at least 1, got {self.fps}")
        if self.halo < 0:
            raise OptionError(f"--halo must be at least 0, got {self.halo}")
        if not 0 <= self.quality <= 10:
            raise OptionError(f"--quality must be in [0, 10], got {self.quality}")


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


@dataclass(frozen=True, kw_only=True, slots=True)
class BenchJob:
    """Time one strategy on a random input of ``shape`` (latents for decode, pixels for encode).

    ``reference``: a file with the untiled result; written by a ``none`` job with ``write_reference``,
    read by the others to measure their error.
    """

    task: str
    strategy: str
    shape: tuple[int, ...]
    repeats: int = 3
    warmup: int = 1
    reference: Path | None = None
    write_reference: bool = False


@dataclass(frozen=True, kw_only=True, slots=True, eq=False)
class Done:
    """A collective decode or encode as rank 0 sees it: the result, how it ran, every rank's stats."""

    tensor: torch.Tensor
    strategy: str
    parts: int
    ranks: list[RankStats]


@dataclass(kw_only=True, slots=True)
class BenchResult:
    """One strategy at one worker count, as rank 0 measured it."""

    strategy: str
    nproc: int
    seconds: float | None
    times: list[float]
    ranks: list[RankStats]
    parts: int
    work: float
    max_abs_err: float | None = None
    note: str = ""


def plan_job(cfg: WorkerConfig, task: str, shape: tuple[int, ...], world: int = 1) -> tuple[str, plan.Grid]:
    """The strategy and tile grid for an input of ``shape`` under ``cfg`` (:func:`engine.choose`)."""
    return engine.choose(cfg.model, cfg.strategy, cfg.tile_size, cfg.tile_overlap, task, shape, world)


class Worker:
    """One rank: its place in the group and its copy of the VAE.

    ``background_writes``: rank 0 writes decode outputs on a :class:`Writer` thread, overlapping
    the next job; :meth:`flush_writes` waits for them.
    """

    def __init__(self, cfg: WorkerConfig, *, background_writes: bool = False) -> None:
        self.cfg = cfg
        self.comm = Comm.join(cfg.device, cfg.backend)
        if cfg.threads is not None and cfg.device == "cpu":
            torch.set_num_threads(cfg.threads)
        self.dtype = DTYPES[cfg.dtype]
        vae, error = None, None
        try:
            vae = load(cfg.model, self.comm.device, self.dtype)
            compat.check_model(vae)
        except VaeparError as exc:
            error = str(exc)
        self.comm.agree(error)  # a model missing on one node stops every node with one line
        shard.install(vae, cfg.model.family.shard_leaves())  # inert outside shard runs
        self.family = cfg.model.family(vae, cfg.model)
        self.groups: dict[int, object] = {}
        self.meter = MemoryMeter(self.comm.device)
        self.jobs_started = 0
        self.writer = Writer() if background_writes and self.comm.rank == 0 else None

    @torch.inference_mode()
    def decode(self, job: DecodeJob) -> JobReport | None:
        """Decode one file; rank 0 writes the output and returns the report.

        With background writes the write is queued to overlap the next job: the report's
        ``outputs`` are filled in once it is written (:meth:`flush_writes`), and a failed write
        stops every rank at the next job's start.
        """
        clock = Stopwatch()

        def read(j: DecodeJob) -> torch.Tensor:
            if self.writer is not None:
                self.writer.make_room()  # inside _on_rank0: an earlier failed write stops every rank
            return self._read_latents(j)

        z = self._spread(self._on_rank0(read, job), "decode")
        done = self.decode_tensor(z, str(job.source), pixels=outputs.wants_pixels(job.output))
        if done is None:
            return None
        report = JobReport(input=str(job.source), outputs=[], input_shape=list(z.shape),
                           output_shape=list(done.tensor.shape), strategy=done.strategy, tiles=done.parts,
                           seconds=0.0, ranks=done.ranks)
        self._write(job.output, done.tensor, report)
        report.seconds = clock.elapsed()
        return report

    def _spread(self, x: torch.Tensor | None, task: str) -> torch.Tensor:
        """Rank 0's input ``x`` on every rank, each receiving only the rows its share of the job
        reads (:func:`engine.input_rows`, planned alike on every rank from the shape)."""
        shape = self.comm.broadcast_object(tuple(x.shape) if x is not None else None)
        strategy, grid = plan_job(self.cfg, task, shape, self.comm.world)
        spans = engine.input_rows(self.cfg.model, task, strategy, grid, shape[-2], self.comm.world, self.cfg.halo)
        return self.comm.scatter_rows(x, spans)

    def _write(self, path: Path, sample: torch.Tensor, report: JobReport) -> None:
        """Write ``sample`` to ``path`` (on the writer's thread, if any), listing the files in ``report``."""
        sample = sample.cpu()  # the writer holds host memory only

        def write() -> None:
            written = outputs.write_sample(path, sample, fps=self.cfg.fps, quality=self.cfg.quality)
            report.outputs[:] = [str(p) for p in written]

        if self.writer is None:
            write()
        else:
            self.writer.submit(write)

    def flush_writes(self, reports: list[JobReport | BenchResult | None]) -> None:
        """Wait for the queued writes, raising the first failure. The wait counts towards the last
        job's seconds, so that the jobs' seconds still add up to the wall time."""
        if self.writer is None:
            return
        clock = Stopwatch()
        self.writer.flush()
        last = next((r for r in reversed(reports) if isinstance(r, JobReport)), None)
        if last is not None:
            last.seconds += clock.elapsed()

    @torch.inference_mode()
    def encode(self, job: EncodeJob) -> JobReport | None:
        """Encode one file; rank 0 writes the latents and returns the report."""
        clock = Stopwatch()
        x, meta = self._on_rank0(self._read_pixels, job) or (None, {})
        x = self._spread(x, "encode")
        done = self.encode_tensor(x, str(job.source))
        if done is None:
            return None
        z = done.tensor if self.cfg.factors is None else self.cfg.factors.scale(done.tensor)
        meta |= {"model": job.model_ref, "scaled": str(self.cfg.factors is not None).lower()}
        written = outputs.write_latents(job.output, z, meta)
        return JobReport(input=str(job.source), outputs=[str(written)], input_shape=pixel_shape(x, meta),
                         output_shape=list(z.shape), strategy=done.strategy, tiles=done.parts,
                         seconds=clock.elapsed(), ranks=done.ranks)

    @torch.inference_mode()
    def decode_tensor(self, z: torch.Tensor, label: str, *, pixels: bool = False) -> Done | None:
        """Collective: decode latents ``z`` (the same on every rank, as ``vae.decode`` takes them);
        rank 0 gets the sample in [-1, 1], checked finite.

        ``pixels``: rank 0 gets it as uint8 instead (:func:`outputs.pixel_bytes`, channels first),
        each rank checking and converting its own part before the gather (:meth:`_pixel_parts`).
        """
        strategy, grid = plan_job(self.cfg, "decode", tuple(z.shape), self.comm.world)
        what = f"{label}: the decoded result"
        finish = self._pixel_parts(what) if pixels else None
        out, ranks, parts = self._run("decode", strategy, z, grid, Path(label).name, finish)
        if out is None:
            return None
        if pixels:
            sample = self.family.arrange(out)  # a permutation of the gathered bytes (Wan 2.2: unpatchify)
        else:
            check_finite(out, what, self.cfg)
            sample = self.family.finish_decode(out)
        return Done(tensor=sample, strategy=strategy, parts=parts, ranks=ranks)

    def _pixel_parts(self, what: str) -> Finish:
        """Each rank's parts of a raw decoder result to uint8 pixels: checked finite on every rank
        together, then :meth:`Family.finish_values` (elementwise) and :func:`outputs.pixel_bytes`.
        Every family's :meth:`Family.finish_decode` splits so (what is not elementwise is only a
        layout, applied on rank 0 by :meth:`Family.arrange`), so no family needs the float gather."""
        def finish(parts: list[torch.Tensor]) -> list[torch.Tensor]:
            check_finite_parts(parts, what, self.cfg, self.comm)
            return [outputs.pixel_bytes(self.family.finish_values(p)) for p in parts]

        return finish

    @torch.inference_mode()
    def encode_tensor(self, x: torch.Tensor, label: str) -> Done | None:
        """Collective: encode pixels ``x`` (prepared for the encoder, the same on every rank);
        rank 0 gets the unscaled latents (mode, or a sample with ``cfg.sample``), checked finite."""
        strategy, grid = plan_job(self.cfg, "encode", tuple(x.shape), self.comm.world)
        out, ranks, parts = self._run("encode", strategy, x, grid, Path(label).name)
        if out is None:
            return None
        check_finite(out, f"{label}: the encoded latents", self.cfg)
        z = self.family.latents(out, sample=self.cfg.sample, seed=self.cfg.seed)
        return Done(tensor=z, strategy=strategy, parts=parts, ranks=ranks)

    def _run(self, task: str, strategy: str, x: torch.Tensor, grid: plan.Grid, label: str,
             finish: Finish | None = None) -> tuple[torch.Tensor | None, list[RankStats], int]:
        """Every rank runs its share; rank 0 gets the joined result (each part through ``finish``
        first, if given), everyone's stats and the number of parts (tiles or bands)."""
        parts = engine.part_count(strategy, grid, latent_rows(self.cfg.model, task, x.shape[-2]), self.comm.world)
        self.jobs_started += 1
        ticker = Ticker(self.comm, f"job{self.jobs_started}", parts * self.family.steps(x, task), label,
                        self.cfg.show_progress)
        self.meter.start()
        stats = RankStats(rank=self.comm.rank, device=str(self.comm.device))
        busy = Stopwatch()

        def counted() -> None:
            stats.tiles += 1

        try:
            out, band = engine.execute(self.family, task, strategy, x, grid, self.comm, halo=self.cfg.halo,
                                       groups=self.groups, tick=ticker.tick, on_part=counted, finish=finish)
        finally:
            ticker.close()
        if band is not None:
            stats.band, stats.exchanges, stats.bytes_sent = list(band.band), band.exchanges, band.bytes_sent
        stats.busy_s, stats.peak_mem_bytes = busy.elapsed(), self.meter.peak()
        return out, self.comm.gather_all(stats), parts

    @torch.inference_mode()
    def bench(self, job: BenchJob) -> BenchResult | None:
        """Run one strategy ``warmup + repeats`` times; rank 0 returns the median and the error."""
        g = torch.Generator().manual_seed(0)
        x = torch.randn(job.shape, generator=g) if job.task == "decode" else torch.rand(job.shape, generator=g) * 2 - 1
        x = self.comm.broadcast(x.to(self.dtype) if self.comm.rank == 0 else None)
        if job.task == "encode":
            x = self.family.prepare_encode(x)
        cfg = replace(self.cfg, strategy=job.strategy)
        strategy, grid = plan_job(cfg, job.task, tuple(x.shape), self.comm.world)
        times, ranks, out, parts = [], [], None, 0
        for i in range(job.warmup + job.repeats):
            self.comm.barrier()
            clock = Stopwatch()
            out, stats, parts = self._run(job.task, strategy, x, grid, f"{strategy} {i + 1}")
            self.comm.barrier()
            if i >= job.warmup:
                times.append(clock.elapsed())
                ranks = stats if not ranks else [_max_peak(a, b) for a, b in zip(ranks, stats)]
        if self.comm.rank != 0:
            return None
        result = self.family.finish_decode(out) if job.task == "decode" else self.family.latents(out, sample=False, seed=None)
        err = self._reference_error(job, result.float())
        work = bench_work(strategy, grid, latent_rows(self.cfg.model, job.task, x.shape[-2]), self.comm.world, self.cfg.halo)
        return BenchResult(strategy=strategy, nproc=self.comm.world, seconds=statistics.median(times),
                           times=times, ranks=ranks, parts=parts, work=work, max_abs_err=err)

    def _reference_error(self, job: BenchJob, result: torch.Tensor) -> float | None:
        from safetensors.torch import load_file, save_file

        if job.reference is None:
            return None
        if job.write_reference:
            save_file({"sample": result.cpu().contiguous()}, str(job.reference))
            return 0.0
        if not job.reference.exists():
            return None
        ref = load_file(job.reference)["sample"].to(result.device)
        return float((result - ref).abs().max())

    def _on_rank0(self, read: Callable[[Job], T], job: Job) -> T | None:
        """``read(job)`` on rank 0 (None elsewhere); a failure there stops every rank with one line."""
        value, error = None, None
        if self.comm.rank == 0:
            try:
                value = read(job)
            except VaeparError as exc:
                error = str(exc)
        self.comm.agree(error)
        return value

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
        """Finish the pending writes (their failures unreported: see :meth:`flush_writes`), leave the group."""
        if self.writer is not None:
            self.writer.close()
        self.comm.close()


def check_finite(out: torch.Tensor, what: str, cfg: WorkerConfig) -> None:
    """Refuse a result with NaN or Inf (an overflow): it would be written as a black image."""
    found = latents.nonfinite(out)
    if found is not None:
        raise VaeparError(_overflow(what, found, cfg))


def check_finite_parts(parts: list[torch.Tensor], what: str, cfg: WorkerConfig, comm: Comm) -> None:
    """Collective: :func:`check_finite` over every rank's ``parts`` of one result (disjoint, together
    the whole); every rank raises the same error, so that none waits in the gather that follows."""
    counts = [latents.nonfinite_counts(p) for p in parts]
    mine = (sum(nan for nan, _ in counts), sum(inf for _, inf in counts))
    everyone = comm.gather_all(mine)
    found = latents.describe_nonfinite(sum(nan for nan, _ in everyone), sum(inf for _, inf in everyone))
    if found is not None:
        raise VaeparError(_overflow(what, found, cfg))


def _overflow(what: str, found: str, cfg: WorkerConfig) -> str:
    remedy = "use --dtype bfloat16 or float32"
    if cfg.dtype == "float16" and cfg.model.config.get("force_upcast", False):
        remedy = "drop --no-upcast (this VAE's config asks for float32), or " + remedy
    return (f"{what} has non-finite values ({found}) computed in {cfg.dtype}: the VAE overflowed; "
            f"{remedy}; nothing was written")


def pixel_shape(x: torch.Tensor, meta: dict[str, str]) -> list[int]:
    """Shape of the pixels before the encoder's preparation (patchifying)."""
    size = [int(meta["height"]), int(meta["width"])]
    return [x.shape[0], 3, *([int(meta["frames"])] if "frames" in meta else []), *size]


def _max_peak(a: RankStats, b: RankStats) -> RankStats:
    return a if a.peak_mem_bytes >= b.peak_mem_bytes else b


def bench_work(strategy: str, grid: plan.Grid, rows: int, world: int, halo: int) -> float:
    """Input area processed (overlaps, margins) over the input area."""
    if strategy == "tiled":
        return grid.amplification()
    if strategy == "patch":
        return sum(b - a for a, b in plan.widened(plan.bands(rows, world), halo, rows)) / rows
    return 1.0


Job = DecodeJob | EncodeJob | BenchJob


def main(cfg: WorkerConfig, jobs: list[Job]) -> list[JobReport | BenchResult] | None:
    """Entry point of every rank: run ``jobs`` in order; rank 0 returns their reports once every
    output is written (decode outputs are written in the background, :mod:`vaepar.writer`)."""
    worker = Worker(cfg, background_writes=True)
    run = {DecodeJob: worker.decode, EncodeJob: worker.encode, BenchJob: worker.bench}
    try:
        reports = [run[type(j)](j) for j in jobs]
        worker.flush_writes(reports)
    finally:
        worker.close()
    return None if worker.comm.rank != 0 else [r for r in reports if r is not None]
