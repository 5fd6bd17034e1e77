"""The ``vaepar`` command line: thin Typer commands over private functions."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from vaepar import launch, latents, outputs, worker
from vaepar.errors import VaeparError
from vaepar.latents import Factors
from vaepar.vae import ModelSpec, resolve

app = typer.Typer(
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
    help="Decode and encode diffusion latents with their VAE in parallel over several workers.",
)
console = Console(stderr=True)

DEVICE_HELP = "Worker device: cpu or cuda (default: cuda when available)."
STRATEGY_HELP = ("none: one worker decodes the whole latent untiled; tiled: diffusers' tile grid "
                 "spread over the workers, bit-identical to diffusers; auto: tiled when the latent "
                 "is larger than one tile, else none.")
DTYPE_HELP = "Compute dtype: float32, float16 or bfloat16 (default: float32 on cpu, bfloat16 on cuda)."


@dataclass(frozen=True, kw_only=True, slots=True)
class Workers:
    """Worker-group options shared by every command."""

    nproc: int
    gpus: int | None
    device: str | None
    threads: int | None
    nnodes: int
    node_rank: int
    rdzv_endpoint: str | None


def _fail(message: str) -> None:
    console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code=1)


def _resolve_device(w: Workers) -> tuple[str, int]:
    import torch

    nproc, device = w.nproc, w.device
    if w.gpus is not None:
        if w.device not in (None, "cuda"):
            raise VaeparError(f"--gpus runs on cuda; it cannot be combined with --device {w.device}")
        device, nproc = "cuda", w.gpus
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda"):
        raise VaeparError(f"--device must be cpu or cuda, got '{device}'")
    if device == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise VaeparError("CUDA is not available on this machine; use --device cpu")
        if nproc > count:
            raise VaeparError(f"asked for {nproc} GPU workers but this machine has {count} CUDA device(s)")
    return device, nproc


def _model_from(model: str | None, subfolder: str | None, first: Path) -> ModelSpec:
    if model is None:
        meta = latents.read(first)[1]
        if "model" not in meta:
            raise VaeparError(f"{first}: no --model given and the file's metadata names no model")
        model = meta["model"]
    return resolve(model, subfolder)


def _output_paths(inputs: list[Path], out: Path, fmt: str | None, video: bool) -> list[Path]:
    suffixes = outputs.VIDEO_SUFFIXES if video else outputs.IMAGE_SUFFIXES
    if len(inputs) == 1 and out.suffix:
        outputs.check_writable(out, suffixes)
        return [out]
    if out.exists() and not out.is_dir():
        raise VaeparError(f"{out}: several inputs need --out to be a folder, but it is a file")
    if not out.parent.is_dir():
        what = "a file" if out.parent.exists() else "not an existing folder"
        raise VaeparError(f"{out}: cannot create the output folder, {out.parent} is {what}")
    ext = "." + (fmt or ("mp4" if video else "png")).lstrip(".")
    paths = [out / f"{p.stem}{ext}" for p in inputs]
    if len(set(paths)) != len(paths):
        raise VaeparError("several inputs share a file name; their outputs would overwrite each other")
    out.mkdir(exist_ok=True)
    for p in paths:
        outputs.check_writable(p, suffixes)
    return paths


def _decode(
    inputs: list[Path], *, out: Path, model: str | None, subfolder: str | None, w: Workers,
    strategy: str, tile_size: int | None, tile_overlap: float, raw: bool,
    scaling_factor: float | None, shift_factor: float | None, height: int | None, width: int | None,
    dtype: str | None, fmt: str | None, fps: int, quality: int, json_path: Path | None, quiet: bool,
) -> None:
    device, nproc = _resolve_device(w)
    spec = launch.LaunchSpec(nproc=nproc, nnodes=w.nnodes, node_rank=w.node_rank,
                             rdzv_endpoint=w.rdzv_endpoint)
    model_spec = _model_from(model, subfolder, inputs[0])
    cfg = worker.WorkerConfig(
        model=model_spec, device=device, dtype=dtype or ("bfloat16" if device == "cuda" else "float32"),
        threads=w.threads if w.threads is not None else (
            launch.default_threads(nproc) if device == "cpu" else None),
        strategy=strategy, tile_size=tile_size, tile_overlap=tile_overlap,
        factors=None if raw else Factors.of(model_spec, scaling_factor, shift_factor),
        fps=fps, quality=quality, show_progress=not quiet,
    )
    if w.node_rank == 0:  # check every input before _output_paths creates an output folder
        for source in inputs:
            shape = latents.load(source, model_spec, height=height, width=width).tensor.shape
            worker.decode_plan(cfg, tuple(shape))
    paths = _output_paths(inputs, out, fmt, model_spec.is_video)
    jobs = [worker.DecodeJob(source=i, output=o, height=height, width=width) for i, o in zip(inputs, paths)]
    reports = launch.run(spec, worker.main, cfg, jobs)
    if reports is None:
        return
    from vaepar import report

    if not quiet:
        report.print_summary(reports, Console())
    if json_path is not None:
        report.write_json(json_path, reports, {
            "command": "decode", "model": model_spec.name, "device": device, "nproc": spec.world,
            "threads": cfg.threads, "dtype": cfg.dtype, "strategy": strategy,
        })


def _guarded(fn: Any, *args: Any, **kwargs: Any) -> None:
    try:
        fn(*args, **kwargs)
    except (VaeparError, ValueError) as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        _fail("interrupted")


@app.command()
def decode(
    latents_in: Annotated[list[Path], typer.Argument(
        metavar="LATENTS", help="Latent files (.safetensors): tensor 'latents' or the only tensor.")],
    out: Annotated[Path, typer.Option("--out", "-o", help=(
        "Output file (.png, .safetensors; .mp4 for video); a folder when several inputs are given."))],
    model: Annotated[str | None, typer.Option("--model", "-m", help=(
        "Local diffusers folder, hub id, or preset (see `vaepar presets`). Default: the model named "
        "in the file's metadata."))] = None,
    subfolder: Annotated[str | None, typer.Option(help="Folder of the VAE inside the model (default: vae where present).")] = None,
    nproc: Annotated[int, typer.Option(help="Number of workers.")] = 1,
    gpus: Annotated[int | None, typer.Option(help="Shorthand for --device cuda --nproc N.")] = None,
    device: Annotated[str | None, typer.Option(help=DEVICE_HELP)] = None,
    threads: Annotated[int | None, typer.Option(help="Intra-op threads per CPU worker (default: cores // workers).")] = None,
    strategy: Annotated[str, typer.Option(help=STRATEGY_HELP)] = "auto",
    tile_size: Annotated[int | None, typer.Option(help="Tile size in pixels, a multiple of the model's scale (default: the model's sample_size; 256 for Wan).")] = None,
    tile_overlap: Annotated[float, typer.Option(help="Tile overlap factor in [0, 0.5).")] = 0.25,
    raw: Annotated[bool, typer.Option("--raw", help="Decode the tensor as given (no unscaling).")] = False,
    scaling_factor: Annotated[float | None, typer.Option(help="Override the model's scaling_factor.")] = None,
    shift_factor: Annotated[float | None, typer.Option(help="Override the model's shift_factor.")] = None,
    height: Annotated[int | None, typer.Option(help="Image height in pixels, to unpack packed (Flux) latents.")] = None,
    width: Annotated[int | None, typer.Option(help="Image width in pixels, to unpack packed (Flux) latents.")] = None,
    dtype: Annotated[str | None, typer.Option(help=DTYPE_HELP)] = None,
    fmt: Annotated[str | None, typer.Option("--format", help="Output format when --out is a folder: png, safetensors or mp4.")] = None,
    fps: Annotated[int, typer.Option(help="Frames per second of MP4 output.")] = 16,
    quality: Annotated[int, typer.Option(help="MP4 quality, 0 (worst) to 10 (best).")] = 8,
    json_path: Annotated[Path | None, typer.Option("--json", help="Write a JSON summary here.")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or summary.")] = False,
    nnodes: Annotated[int, typer.Option(help="Number of nodes (multi-node runs).")] = 1,
    node_rank: Annotated[int, typer.Option(help="This node's rank, 0 to nnodes-1.")] = 0,
    rdzv_endpoint: Annotated[str | None, typer.Option(help="HOST:PORT where the nodes meet (c10d rendezvous).")] = None,
) -> None:
    """Decode latents into images (PNG), videos (MP4) or tensors (safetensors)."""
    w = Workers(nproc=nproc, gpus=gpus, device=device, threads=threads, nnodes=nnodes,
                node_rank=node_rank, rdzv_endpoint=rdzv_endpoint)
    _guarded(_decode, latents_in, out=out, model=model, subfolder=subfolder, w=w, strategy=strategy,
             tile_size=tile_size, tile_overlap=tile_overlap, raw=raw, scaling_factor=scaling_factor,
             shift_factor=shift_factor, height=height, width=width, dtype=dtype, fmt=fmt, fps=fps,
             quality=quality, json_path=json_path, quiet=quiet)


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
