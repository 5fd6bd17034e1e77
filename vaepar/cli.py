"""The ``vaepar`` command line: thin Typer commands over private functions."""

from __future__ import annotations

import os
import signal
import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from vaepar import heap  # no torch: the environment below is set before torch is imported

# torch's C++ warnings (a store connection closing when another node stops) are noise here.
os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
heap.use_huge_pages()

from vaepar import compat, launch, latents, outputs, pixels, worker  # noqa: E402 - after the environment
from vaepar.comm import backend_problem  # noqa: E402
from vaepar.errors import InternalError, OptionError, VaeparError  # noqa: E402
from vaepar.latents import Factors  # noqa: E402
from vaepar.protocol import DEFAULT_MAX_PIXELS  # noqa: E402
from vaepar.vae import ModelSpec, architectures, model_reference, resolve  # noqa: E402

app = typer.Typer(
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
    help="Decode and encode diffusion latents with their VAE in parallel over several workers.",
)
console = Console(stderr=True)

STRATEGY_HELP = ("none: one worker runs the whole input untiled; tiled: diffusers' tile grid spread "
                 "over the workers, bit-identical to diffusers; shard: rows split into bands with halo "
                 "exchange inside every layer, equal to untiled up to float rounding; patch: bands "
                 "with --halo rows of margin, no communication; auto: shard on several workers (unless "
                 "--tile-size is given), else tiled when the input is larger than one tile, else none.")

Model = Annotated[str | None, typer.Option("--model", "-m", help=(
    "Local diffusers folder, hub id, or preset (see `vaepar presets`)."))]
Subfolder = Annotated[str | None, typer.Option(help="Folder of the VAE inside the model (default: vae where present).")]
Nproc = Annotated[int | None, typer.Option(help="Number of workers on this node (default 1).", show_default=False)]
Gpus = Annotated[int | None, typer.Option(help="Shorthand for --device cuda --nproc N.")]
Device = Annotated[str | None, typer.Option(help="Worker device: cpu or cuda (default: cuda when available).")]
Threads = Annotated[int | None, typer.Option(help="Intra-op threads per CPU worker (default: cores // workers).")]
Backend = Annotated[str | None, typer.Option(help=(
    "Collective backend: nccl (cuda, one GPU per worker) or gloo (cpu; on cuda it lets several workers share a "
    "GPU, staging every transfer through host memory: for testing). Default: nccl on cuda, gloo on cpu."),
    show_default=False)]
Strategy = Annotated[str, typer.Option(help=STRATEGY_HELP)]
TileSize = Annotated[int | None, typer.Option(help=(
    "Tile size in pixels, a multiple of the model's scale (default: the model's sample_size; 256 for Wan). "
    "tiled and auto only; with auto it selects tiled."))]
TileOverlap = Annotated[float | None, typer.Option(help="Tile overlap factor in [0, 0.5) (default: the class's own, 0.25; LTX-2 0.125); tiled and auto only.",
                                                   show_default=False)]
ScalingFactor = Annotated[float | None, typer.Option(help="Override the model's scaling_factor (AutoencoderKL).")]
ShiftFactor = Annotated[float | None, typer.Option(help="Override the model's shift_factor (AutoencoderKL).")]
Dtype = Annotated[str | None, typer.Option(help=(
    "Compute dtype: float32, float16 or bfloat16 (default: float32 on cpu, bfloat16 on cuda). float16 "
    "runs in float32 when the VAE's config sets force_upcast, as diffusers' pipelines do."))]
Upcast = Annotated[bool, typer.Option("--upcast/--no-upcast", help=(
    "With --dtype float16: compute in float32 when the VAE's config sets force_upcast (SD, SDXL), as "
    "diffusers' pipelines do. --no-upcast keeps float16 (may overflow; a non-finite result is an error)."))]
JsonPath = Annotated[Path | None, typer.Option("--json", help="Write a JSON summary here.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or summary.")]
Nnodes = Annotated[int, typer.Option(help="Number of nodes (multi-node runs).")]
NodeRank = Annotated[int, typer.Option(help=(
    "This node's rank, 0 to nnodes-1. Node 0 reads the inputs and writes the outputs."))]
RdzvEndpoint = Annotated[str | None, typer.Option(help="HOST:PORT where the nodes meet (c10d rendezvous).")]
Halo = Annotated[int | None, typer.Option(help=(
    "patch strategy only: latent rows of margin above and below each band (default 8)."), show_default=False)]
Verbose = Annotated[bool, typer.Option("--verbose", "-v", help="Per-rank details: band, halo exchanges, bytes sent.")]
Debug = Annotated[bool, typer.Option("--debug", envvar="VAEPAR_DEBUG", help=(
    "Print the traceback of an internal error (also: VAEPAR_DEBUG=1)."))]


def _given(**options: Any) -> dict[str, Any]:
    """The options the user gave: the others keep :class:`worker.WorkerConfig`'s defaults."""
    return {k: v for k, v in options.items() if v is not None}


@dataclass(frozen=True, kw_only=True, slots=True)
class Workers:
    """Worker-group options shared by every command."""

    nproc: int | None
    gpus: int | None
    device: str | None
    threads: int | None
    nnodes: int
    backend: str | None = None
    node_rank: int
    rdzv_endpoint: str | None

    def meeting(self) -> launch.LaunchSpec:
        """Where this node meets the others: enough to tell them about a failure."""
        return launch.LaunchSpec(nnodes=self.nnodes, node_rank=self.node_rank, rdzv_endpoint=self.rdzv_endpoint)


@dataclass(frozen=True, kw_only=True, slots=True)
class Run:
    """Options shared by decode and encode."""

    workers: Workers
    strategy: str
    tile_size: int | None
    tile_overlap: float | None
    raw: bool
    scaling_factor: float | None
    shift_factor: float | None
    dtype: str | None
    upcast: bool
    json_path: Path | None
    quiet: bool
    halo: int | None
    verbose: bool

    @staticmethod
    def of(options: dict[str, Any]) -> Run:
        """From a command's parameters (its ``locals()``), by field name."""
        workers = Workers(**{f: options[f] for f in Workers.__dataclass_fields__})
        return Run(workers=workers, **{f: options[f] for f in Run.__dataclass_fields__ if f != "workers"})


def _fail(message: str, code: int = 1) -> None:
    console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code=code)


def _resolve_device(w: Workers) -> tuple[str, int]:
    import torch

    nproc, device = w.nproc if w.nproc is not None else 1, w.device
    if w.gpus is not None:
        if w.nproc is not None and w.nproc != w.gpus:
            raise OptionError(f"--gpus {w.gpus} already sets the number of workers; drop --nproc {w.nproc}")
        if w.device not in (None, "cuda"):
            raise OptionError(f"--gpus runs on cuda; it cannot be combined with --device {w.device}")
        device, nproc = "cuda", w.gpus
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda"):
        raise OptionError(f"--device must be cpu or cuda, got '{device}'")
    if device == "cuda" and w.threads is not None:
        raise OptionError("--threads sets CPU threads per worker; it has no effect with --device cuda")
    if (problem := backend_problem(device, w.backend)) is not None:
        raise OptionError(problem)
    if device == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise VaeparError("CUDA is not available on this machine; use --device cpu")
        if nproc > count and w.backend != "gloo":
            raise VaeparError(f"asked for {nproc} GPU workers but this machine has {count} CUDA device(s): NCCL "
                              "needs one GPU per worker (--backend gloo lets workers share a GPU, for testing)")
    return device, nproc


def _model_from(model: str | None, subfolder: str | None, first: Path, node_rank: int) -> ModelSpec:
    if model is None:
        if node_rank != 0:
            raise OptionError("nodes other than --node-rank 0 do not read the inputs: give them --model")
        meta = latents.read(first)[1]
        if "model" not in meta:
            raise VaeparError(f"{first}: no --model given and the file's metadata names no model")
        model = meta["model"]
    return resolve(model, subfolder)


def _output_paths(inputs: list[Path], out: Path, ext: str, suffixes: tuple[str, ...]) -> list[Path]:
    """One output per input: ``out`` itself for a single input with a suffix, else files in folder ``out``."""
    if len(inputs) == 1 and out.suffix:
        outputs.check_writable(out, suffixes)
        return [out]
    if out.exists() and not out.is_dir():
        raise VaeparError(f"{out}: several inputs need --out to be a folder, but it is a file")
    if not out.parent.is_dir():
        what = "a file" if out.parent.exists() else "not an existing folder"
        raise VaeparError(f"{out}: cannot create the output folder, {out.parent} is {what}")
    paths = [out / f"{p.stem}.{ext.lstrip('.')}" for p in inputs]
    if len(set(paths)) != len(paths):
        raise VaeparError("several inputs share a file name; their outputs would overwrite each other")
    out.mkdir(exist_ok=True)
    for p in paths:
        outputs.check_writable(p, suffixes)
    return paths


def _check_options(run: Run, spec: ModelSpec) -> None:
    """Options that contradict each other or would be ignored are errors, never dropped silently."""
    strategy = run.strategy
    if run.quiet and run.verbose:
        raise OptionError("--quiet and --verbose contradict each other; pick one")
    if run.halo is not None and strategy != "patch":
        raise OptionError(f"--halo applies to --strategy patch only, not {strategy}")
    tiling = [o for o, v in (("--tile-size", run.tile_size), ("--tile-overlap", run.tile_overlap)) if v is not None]
    if tiling and strategy not in ("tiled", "auto"):
        raise OptionError(f"{'/'.join(tiling)} applies to --strategy tiled or auto, not {strategy}")
    factors = [o for o, v in (("--scaling-factor", run.scaling_factor), ("--shift-factor", run.shift_factor))
               if v is not None]
    if factors and run.raw:
        raise OptionError(f"--raw skips (un)scaling, so {'/'.join(factors)} would be ignored")
    if factors and not spec.family.scalar_factors:
        raise OptionError(f"{'/'.join(factors)} apply to AutoencoderKL latents; {spec.class_name} (un)scales "
                          f"{spec.family.scaling_rule}")
    if not run.upcast and run.dtype != "float16":
        raise OptionError("--no-upcast only matters with --dtype float16")


def _compute_dtype(run: Run, spec: ModelSpec, device: str) -> str:
    """The dtype workers compute in: float16 becomes float32 where the VAE's config sets
    ``force_upcast`` (diffusers' pipelines upcast such VAEs), unless ``--no-upcast``."""
    dtype = run.dtype or ("bfloat16" if device == "cuda" else "float32")
    if dtype == "float16" and run.upcast and spec.config.get("force_upcast", False):
        if not run.quiet and run.workers.node_rank == 0:
            console.print("note: the VAE's config sets force_upcast, so float16 runs in float32 as in diffusers' "
                          "pipelines (--no-upcast keeps float16)", highlight=False, soft_wrap=True)
        return "float32"
    return dtype


def _setup(run: Run, spec: ModelSpec, **extra: Any) -> tuple[launch.LaunchSpec, worker.WorkerConfig]:
    w = run.workers
    _check_options(run, spec)
    device, nproc = _resolve_device(w)
    group = launch.LaunchSpec(nproc=nproc, nnodes=w.nnodes, node_rank=w.node_rank, rdzv_endpoint=w.rdzv_endpoint)
    cfg = worker.WorkerConfig(
        model=spec, device=device, backend=w.backend, dtype=_compute_dtype(run, spec, device),
        threads=w.threads if w.threads is not None else (launch.default_threads(nproc) if device == "cpu" else None),
        strategy=run.strategy, tile_size=run.tile_size,
        factors=None if run.raw else Factors.of(spec, run.scaling_factor, run.shift_factor),
        show_progress=not run.quiet, verbose=run.verbose,
        **_given(tile_overlap=run.tile_overlap, halo=run.halo, **extra),
    )
    return group, cfg


def _execute(command: str, run: Run, group: launch.LaunchSpec, cfg: worker.WorkerConfig, jobs: list[Any]) -> None:
    reports = launch.run(group, worker.main, cfg, jobs)
    if reports is None:
        if group.node_rank != 0 and not run.quiet:
            console.print(f"node {group.node_rank}: done; node 0 wrote the outputs", highlight=False)
        return
    from vaepar import report

    if not run.quiet:
        report.print_summary(reports, Console(), verbose=run.verbose)
    if run.json_path is not None:
        report.write_json(run.json_path, reports, {
            "command": command, "model": cfg.model.name, "device": cfg.device, "nproc": group.world,
            "threads": cfg.threads, "dtype": cfg.dtype, "requested_dtype": run.dtype, "strategy": cfg.strategy,
        })


def _output_format(inputs: list[Path], out: Path, fmt: str | None, spec: ModelSpec) -> str:
    """The decode output's format: --out's suffix for one input, else --format or the default."""
    if fmt is not None and fmt.lower() not in ("png", "safetensors", "mp4"):
        raise OptionError(f"--format must be png, safetensors or mp4, got '{fmt}'")
    if len(inputs) == 1 and out.suffix:
        if fmt is not None and fmt.lower() != out.suffix.lower().lstrip("."):
            raise OptionError(f"--format {fmt} contradicts --out {out.name}; drop one")
        return out.suffix.lower().lstrip(".")
    return (fmt or ("mp4" if spec.is_video else "png")).lower()


def _decode(inputs: list[Path], *, out: Path, model: str | None, subfolder: str | None, run: Run,
            height: int | None, width: int | None, fmt: str | None, fps: int | None, quality: int | None) -> None:
    w = run.workers
    with launch.announcing(w.meeting()):
        compat.check_diffusers()
        spec = _model_from(model, subfolder, inputs[0], w.node_rank)
        ext = _output_format(inputs, out, fmt, spec)
        if ext != "mp4" and (fps is not None or quality is not None):
            raise OptionError(f"--fps/--quality apply to MP4 output, not {ext.upper()}")
        group, cfg = _setup(run, spec, fps=fps, quality=quality)
        home = w.node_rank == 0  # the node that reads inputs and writes outputs
        jobs = [_decode_job(source, cfg, group, height, width, home) for source in inputs]
        suffixes = outputs.VIDEO_SUFFIXES if spec.is_video else outputs.IMAGE_SUFFIXES
        paths = _output_paths(inputs, out, ext, suffixes) if home else [out] * len(inputs)
    _execute("decode", run, group, cfg, [replace(j, output=p) for j, p in zip(jobs, paths)])


def _decode_job(source: Path, cfg: worker.WorkerConfig, group: launch.LaunchSpec, height: int | None,
                width: int | None, home: bool) -> worker.DecodeJob:
    """Check one input (on the home node) before any output folder is made or worker started."""
    scaled = True
    if home:
        found = latents.load(source, cfg.model, height=height, width=width)
        worker.plan_job(cfg, "decode", tuple(found.tensor.shape), group.world)
        scaled = found.metadata.get("scaled", "true").lower() != "false"
    return worker.DecodeJob(source=source, output=source, height=height, width=width, scaled=scaled)


def _encode(inputs: list[Path], *, out: Path, model: str, subfolder: str | None, run: Run,
            frames: int | None, fit: str | None, sample: bool, seed: int | None) -> None:
    w = run.workers
    with launch.announcing(w.meeting()):
        compat.check_diffusers()
        if seed is not None and not sample:
            raise OptionError("--seed applies to --sample; the mode (the default) has no randomness")
        if frames is not None and frames < 1:
            raise OptionError(f"--frames must be at least 1, got {frames}")
        spec = resolve(model, subfolder)
        group, cfg = _setup(run, spec, sample=sample, seed=seed)
        paths = [out] * len(inputs)
        if w.node_rank == 0:
            for source in inputs:
                x = pixels.prepare(source, spec, frames=frames, how=fit)
                worker.plan_job(cfg, "encode", tuple(spec.family.prepare_pixels(spec, x).shape), group.world)
            paths = _output_paths(inputs, out, "safetensors", (".safetensors",))
    ref = model_reference(spec)
    jobs = [worker.EncodeJob(source=i, output=o, frames=frames, fit=fit, model_ref=ref) for i, o in zip(inputs, paths)]
    _execute("encode", run, group, cfg, jobs)


def _guarded(fn: Any, *args: Any, debug: bool = False, **kwargs: Any) -> None:
    """Run a command: user errors are one line (exit 1; options: 2); anything else is an internal
    error, one line plus the traceback with --debug (exit 3)."""
    try:
        fn(*args, **kwargs)
    except OptionError as exc:
        _fail(str(exc), code=2)
    except VaeparError as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        _fail("interrupted", code=130)
    except InternalError as exc:
        _internal(str(exc), exc.traceback, debug)
    except Exception as exc:  # noqa: BLE001 - the last line of defence: never a bare traceback
        _internal(f"{type(exc).__name__}: {exc}", traceback.format_exc(), debug)


def _internal(message: str, trace: str, debug: bool) -> None:
    if debug and trace:
        console.print(trace.rstrip(), markup=False, highlight=False, soft_wrap=True)
    hint = "" if debug else "; rerun with --debug (or VAEPAR_DEBUG=1) for the traceback"
    _fail(f"internal error (a bug in vaepar, please report it): {message.splitlines()[0] if message else ''}{hint}",
          code=3)


@app.command()
def decode(
    latents_in: Annotated[list[Path], typer.Argument(
        metavar="LATENTS", help="Latent files (.safetensors): tensor 'latents' or the only tensor.")],
    out: Annotated[Path, typer.Option("--out", "-o", help=(
        "Output file (.png, .safetensors; .mp4 for video); a folder when several inputs are given."))],
    model: Model = None,
    subfolder: Subfolder = None,
    nproc: Nproc = None,
    gpus: Gpus = None,
    device: Device = None,
    threads: Threads = None,
    backend: Backend = None,
    strategy: Strategy = "auto",
    tile_size: TileSize = None,
    tile_overlap: TileOverlap = None,
    raw: Annotated[bool, typer.Option("--raw", help=(
        "Decode the tensor as given. Default: unscale as pipelines do, unless the file's metadata "
        "says scaled=false."))] = False,
    scaling_factor: ScalingFactor = None,
    shift_factor: ShiftFactor = None,
    height: Annotated[int | None, typer.Option(help="Image height in pixels, to unpack packed (Flux) latents.")] = None,
    width: Annotated[int | None, typer.Option(help="Image width in pixels, to unpack packed (Flux) latents.")] = None,
    dtype: Dtype = None,
    upcast: Upcast = True,
    fmt: Annotated[str | None, typer.Option("--format", help="Output format when --out is a folder: png, safetensors or mp4.")] = None,
    fps: Annotated[int | None, typer.Option(help="Frames per second of MP4 output (default 16).",
                                            show_default=False)] = None,
    quality: Annotated[int | None, typer.Option(help="MP4 quality, 0 (worst) to 10 (best) (default 8).",
                                                show_default=False)] = None,
    halo: Halo = None,
    json_path: JsonPath = None,
    quiet: Quiet = False,
    verbose: Verbose = False,
    debug: Debug = False,
    nnodes: Nnodes = 1,
    node_rank: NodeRank = 0,
    rdzv_endpoint: RdzvEndpoint = None,
) -> None:
    """Decode latents into images (PNG), videos (MP4) or tensors (safetensors).

    Without --model, the model named in the first file's metadata is used.
    """
    run = Run.of(locals())
    _guarded(_decode, latents_in, out=out, model=model, subfolder=subfolder, run=run, height=height, width=width,
             fmt=fmt, fps=fps, quality=quality, debug=debug)


@app.command()
def encode(
    inputs: Annotated[list[Path], typer.Argument(
        metavar="INPUTS", help="Images (PNG/JPEG), videos (MP4) or pixel tensors (.safetensors, key 'sample', in [-1, 1]).")],
    out: Annotated[Path, typer.Option("--out", "-o", help=(
        "Output latent file (.safetensors); a folder when several inputs are given."))],
    model: Annotated[str, typer.Option("--model", "-m", help=(
        "Local diffusers folder, hub id, or preset (see `vaepar presets`)."))],
    subfolder: Subfolder = None,
    nproc: Nproc = None,
    gpus: Gpus = None,
    device: Device = None,
    threads: Threads = None,
    backend: Backend = None,
    strategy: Strategy = "auto",
    tile_size: TileSize = None,
    tile_overlap: TileOverlap = None,
    raw: Annotated[bool, typer.Option("--raw", help="Write latents unscaled. Default: scaled as pipelines expect.")] = False,
    scaling_factor: ScalingFactor = None,
    shift_factor: ShiftFactor = None,
    frames: Annotated[int | None, typer.Option(help="Video: encode only the first N frames (Wan: 1 + 4k).")] = None,
    fit: Annotated[str | None, typer.Option(help=(
        "Sizes that are not a multiple of the model's scale: crop (centre) or resize. Default: refuse."))] = None,
    sample: Annotated[bool, typer.Option("--sample", help="Sample the latent distribution instead of taking its mode.")] = False,
    seed: Annotated[int | None, typer.Option(help="Seed for --sample (default 0).")] = None,
    dtype: Dtype = None,
    upcast: Upcast = True,
    halo: Halo = None,
    json_path: JsonPath = None,
    quiet: Quiet = False,
    verbose: Verbose = False,
    debug: Debug = False,
    nnodes: Nnodes = 1,
    node_rank: NodeRank = 0,
    rdzv_endpoint: RdzvEndpoint = None,
) -> None:
    """Encode images or videos into latents (.safetensors) that `vaepar decode` reads back."""
    run = Run.of(locals())
    _guarded(_encode, inputs, out=out, model=model, subfolder=subfolder, run=run, frames=frames, fit=fit,
             sample=sample, seed=seed, debug=debug)


def _counts(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise VaeparError(f"worker counts must be integers separated by commas, got '{text}'") from None


def _resolution(text: str) -> tuple[int, int]:
    try:
        h, _, w = text.lower().partition("x")
        return int(h), int(w or h)
    except ValueError:
        raise VaeparError(f"--resolution must be N or HxW in pixels, got '{text}'") from None


def _bench(*, model: str | None, subfolder: str | None, resolution: str, frames: int | None, batch: int,
           nproc: str | None, gpus: str | None, device: str | None, strategies: str, repeats: int, warmup: int,
           task: str, dtype: str | None, tile_size: int | None, tile_overlap: float | None, halo: int | None,
           json_path: Path | None, show_plan: bool, threads: int | None, backend: str | None) -> None:
    from vaepar import bench, report
    from vaepar.vae import architecture

    if model in architectures():
        spec = architecture(model)
    else:
        spec = resolve(model, subfolder) if model else architecture("wan-vae" if frames else "sd-vae")
    if gpus is not None and nproc is not None:
        raise OptionError(f"--gpus {gpus} already sets the worker counts; drop --nproc {nproc}")
    compat.check_diffusers()
    counts = _counts(gpus if gpus is not None else nproc or "1,2")
    device = "cuda" if gpus is not None else device
    if not show_plan:
        _resolve_device(Workers(nproc=max(counts, default=1), gpus=None, device=device, threads=None,
                                nnodes=1, node_rank=0, rdzv_endpoint=None, backend=backend))
    device = device or ("cuda" if not show_plan and __import__("torch").cuda.is_available() else "cpu")
    cfg = worker.WorkerConfig(model=spec, device=device, backend=backend,
                              dtype=dtype or ("bfloat16" if device == "cuda" else "float32"),
                              tile_size=tile_size, show_progress=False, threads=threads,
                              **_given(tile_overlap=tile_overlap, halo=halo))
    b = bench.BenchConfig(cfg=cfg, task=task, shape=bench.input_shape(spec, task, _resolution(resolution), frames, batch),
                          counts=counts, strategies=tuple(v.strip() for v in strategies.split(",") if v.strip()),
                          repeats=repeats, warmup=warmup)
    out = Console()
    if show_plan:
        rows = bench.plan_rows(b)
        report.print_plan(rows, b, out)
        doc = {"model": spec.name, "task": task, "latent_shape": list(b.latent_shape), "dtype": cfg.dtype, "plan": rows}
    else:
        doc = bench.measure(b)
        report.print_bench(doc, out)
    if json_path is not None:
        report.write_doc(json_path, doc)


@app.command()
def bench(
    model: Annotated[str | None, typer.Option("--model", "-m", help=(
        "Model as for decode, or an architecture of configs/architectures/ with random weights, no download: "
        f"{', '.join(architectures())}. Default: sd-vae (wan-vae with --frames)."))] = None,
    subfolder: Subfolder = None,
    resolution: Annotated[str, typer.Option(help="Pixel size of the image or video: N or HxW.")] = "1024",
    frames: Annotated[int | None, typer.Option(help="Video frames (1 + 4k): benchmark a video (Wan) model.")] = None,
    batch: Annotated[int, typer.Option(help="Batch size.")] = 1,
    nproc: Annotated[str | None, typer.Option(help="Worker counts, comma-separated (default 1,2).",
                                              show_default=False)] = None,
    gpus: Annotated[str | None, typer.Option(help="GPU worker counts, comma-separated (implies --device cuda).")] = None,
    device: Device = None,
    strategies: Annotated[str, typer.Option(help="Strategies, comma-separated.")] = "none,tiled,patch,shard",
    repeats: Annotated[int, typer.Option(help="Timed runs per strategy (the median is reported).")] = 3,
    warmup: Annotated[int, typer.Option(help="Untimed runs first.")] = 1,
    task: Annotated[str, typer.Option(help="decode or encode.")] = "decode",
    dtype: Dtype = None,
    tile_size: TileSize = None,
    tile_overlap: TileOverlap = None,
    halo: Halo = None,
    threads: Threads = None,
    backend: Backend = None,
    json_path: JsonPath = None,
    show_plan: Annotated[bool, typer.Option("--plan", help=(
        "Compute nothing: predict imbalance, work, bytes sent and activation memory per rank for any "
        "worker counts (e.g. --nproc 1,2,4,8,16,32,64)."))] = False,
    debug: Debug = False,
) -> None:
    """Benchmark strategies x worker counts: time, peak memory, speedup, error; or --plan them."""
    _guarded(_bench, model=model, subfolder=subfolder, resolution=resolution, frames=frames, batch=batch,
             nproc=nproc, gpus=gpus, device=device, strategies=strategies, repeats=repeats, warmup=warmup,
             task=task, dtype=dtype, tile_size=tile_size, tile_overlap=tile_overlap, halo=halo,
             json_path=json_path, show_plan=show_plan, threads=threads, backend=backend, debug=debug)


def _serve(*, model: str, subfolder: str | None, run: Run, http: Any, token_file: Path | None,
           fps: int | None, quality: int | None) -> None:
    from vaepar import server
    from vaepar.pool import Pool

    compat.check_diffusers()
    http = replace(http, token=_token(http.token, token_file))
    spec = resolve(model, subfolder)
    group, cfg = _setup(run, spec, fps=fps, quality=quality)
    cfg = replace(cfg, show_progress=False)
    sock = server.listen(http)
    if not http.loopback:
        console.print(f"[bold yellow]warning:[/] listening on {escape(http.host)}, reachable from other machines"
                      f"{'' if http.token else ' by anyone: set a token (--token-file or VAEPAR_TOKEN)'}",
                      highlight=False, soft_wrap=True)
    pool = Pool(group, cfg, max_queue=http.max_queue, job_timeout=http.job_timeout)
    console.print(f"loading {spec.name} on {group.world} {cfg.device} worker(s) ...", highlight=False, soft_wrap=True)
    try:
        with _signals_interrupt():
            pool.start()
        app = server.App(pool, spec, http, worker.DTYPES[cfg.dtype])
        base = server.url(sock, http.host)
        server.configure_logging()
        console.print(f"serving {spec.name} at {base} (POST /decode, POST /encode, GET /health, GET /metrics; "
                      "Ctrl+C stops)", highlight=False, soft_wrap=True)
        server.serve(app, sock, http)
    except KeyboardInterrupt:
        pass
    finally:
        sock.close()
        pool.close()
    console.print("stopped", highlight=False)


def _token(token: str | None, token_file: Path | None) -> str | None:
    if token is not None and token_file is not None:
        raise OptionError("give the token once: --token (or VAEPAR_TOKEN) or --token-file")
    if token_file is None:
        return token
    try:
        return token_file.read_text().strip()
    except OSError as exc:
        raise VaeparError(f"{token_file}: cannot read the token file ({exc.strerror})") from None


@contextmanager
def _signals_interrupt() -> Iterator[None]:
    """SIGTERM stops a server that is still starting, as Ctrl+C does (exit 0, workers stopped)."""
    def interrupt(sig: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@app.command()
def serve(
    model: Annotated[str, typer.Option("--model", "-m", help=(
        "Local diffusers folder, hub id, or preset (see `vaepar presets`)."))],
    subfolder: Subfolder = None,
    nproc: Nproc = None,
    gpus: Gpus = None,
    device: Device = None,
    threads: Threads = None,
    backend: Backend = None,
    strategy: Strategy = "auto",
    tile_size: TileSize = None,
    tile_overlap: TileOverlap = None,
    dtype: Dtype = None,
    upcast: Upcast = True,
    halo: Halo = None,
    host: Annotated[str, typer.Option(help=(
        "Address to listen on. Default: this machine only; any other address prints a warning."))] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port (0: any free port, printed at start).")] = 8000,
    max_queue: Annotated[int, typer.Option(help=(
        "Requests that may wait while the workers run one; more get 503 with Retry-After."))] = 16,
    max_pixels: Annotated[int, typer.Option(help=(
        "Most output pixels per request (all images or frames together); more get 413."))] = DEFAULT_MAX_PIXELS,
    token: Annotated[str | None, typer.Option(envvar="VAEPAR_TOKEN", help=(
        "Require this token: 'Authorization: Bearer TOKEN' or ?token=TOKEN in the endpoint URL. "
        "Prefer VAEPAR_TOKEN or --token-file (a command line is visible to other users)."))] = None,
    token_file: Annotated[Path | None, typer.Option(help="Read the token from this file.")] = None,
    timeout: Annotated[float, typer.Option(help=(
        "Seconds one request may run on the workers; past it the workers are restarted and it gets 503."))] = 600.0,
    fps: Annotated[int | None, typer.Option(help="Frames per second of MP4 replies (default 16).",
                                            show_default=False)] = None,
    quality: Annotated[int | None, typer.Option(help="MP4 quality, 0 (worst) to 10 (best) (default 8).",
                                                show_default=False)] = None,
    debug: Debug = False,
) -> None:
    """Serve decode and encode over HTTP with diffusers' Remote VAE protocol (remote_decode/remote_encode).

    The workers load the model once and stay warm; requests run one at a time, each on all workers.
    """
    run = Run(workers=Workers(nproc=nproc, gpus=gpus, device=device, threads=threads, nnodes=1, node_rank=0,
                              rdzv_endpoint=None, backend=backend),
              strategy=strategy, tile_size=tile_size, tile_overlap=tile_overlap, raw=True, scaling_factor=None,
              shift_factor=None, dtype=dtype, upcast=upcast, json_path=None, quiet=False, halo=halo, verbose=False)
    _guarded(_serve_checked, model=model, subfolder=subfolder, run=run, token_file=token_file, fps=fps,
             quality=quality, http_options=dict(host=host, port=port, max_queue=max_queue, max_pixels=max_pixels,
                                                token=token, job_timeout=timeout), debug=debug)


def _serve_checked(*, http_options: dict[str, Any], **kwargs: Any) -> None:
    from vaepar.server import ServeConfig

    _serve(http=ServeConfig(**http_options), **kwargs)


@app.command("presets")
def presets_cmd() -> None:
    """List the named models usable with --model."""
    from vaepar.vae import presets

    for name, entry in sorted(presets().items()):
        sub = entry.get("subfolder", "")
        where = entry["repo"] if "repo" in entry else f"(shipped) vaepar/{entry['path']}"
        print(f"{name:16} {where}{'/' + sub if sub else ''}")


def main() -> None:
    """Console entry point: usage errors, too, come out as one line."""
    try:  # recent typer vendors click
        from typer._click.exceptions import NoArgsIsHelpError, UsageError
    except ImportError:
        from click.exceptions import NoArgsIsHelpError, UsageError

    try:
        code = app(prog_name="vaepar", standalone_mode=False)
    except NoArgsIsHelpError as exc:
        print(exc.ctx.get_help() if exc.ctx is not None else exc.format_message())
        sys.exit(0)
    except UsageError as exc:
        hint = f" (see '{exc.ctx.command_path} --help')" if exc.ctx is not None else ""
        console.print(f"[bold red]error:[/] {escape(exc.format_message())}{hint}", highlight=False,
                      soft_wrap=True)
        sys.exit(2)
    except typer.Abort:
        console.print("[bold red]error:[/] interrupted", highlight=False)
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
