"""Compare vaepar with DistVAE (xdit-project/DistVAE 0.1.0) on the same decode, in one run.

Every method decodes the same seeded latents with the same VAE (the SD-VAE architecture of
configs/architectures/sd-vae.json with vaepar's seeded random weights, rebuilt bit-identically on
every worker) and the same intra-op threads per worker. Each method runs in a launch of its own
(torch's elastic launcher through vaepar.launch, gloo), in a fixed order, in fresh worker processes:
what one method leaves in the allocator does not change another's time or peak RSS.

  untiled         diffusers' own ``vae.decode`` on one worker (the reference for the errors)
  vaepar-untiled  ``vaepar.parallelize(vae)`` on one worker: the VAE's own decode as vaepar runs it
                  (activations that only take a norm's fresh output in place, the freed heap
                  handed back before the last upsampler; bit-identical)
  distvae-patch   ``distvae.vae.parallelize_decoder``: DistVAE's DecoderAdapter splits the rows of
                  the up blocks over the ranks (conv_in and the mid block run whole on every rank)
  distvae-tiled   ``distvae.vae.tiled_decode_for`` with ``distvae.vae.sharing(group)``: diffusers'
                  tile grid, whole tiles dealt to the ranks
  vaepar-shard    ``vaepar.parallelize(vae, strategy="shard")``
  vaepar-tiled    ``vaepar.parallelize(vae, strategy="tiled", tile_size=...)``

Allocator environment: the ``vaepar`` command sets PyTorch's ``THP_MEM_ALLOC_ENABLE=1``
(:data:`vaepar.heap.TORCH_ENV`) for itself and its workers; diffusers and DistVAE leave torch's
default. ``--huge-pages vaepar`` (the default) gives each method's workers its own tool's setting,
``all`` or ``none`` the same to every method.

For each: the median seconds of ``--repeats`` timed decodes (after ``--warmup`` untimed ones), the
peak RSS per rank above its level before the decode (vaepar's own MemoryMeter, the max over the
timed decodes), and max |method - untiled| on rank 0's result. Both tiled methods use the tile
``--tile-size`` pixels with diffusers' default overlap (0.25): at a resolution no larger than the
tile they decode untiled.

Setup: DistVAE is not a vaepar dependency; install it without its dependencies first
(torch and diffusers are already there):

    pip install --no-deps distvae==0.1.0

Usage:

    python scripts/compare_peers.py --resolution 512 --nproc 2 --threads 1 --repeats 3 --warmup 1
    python scripts/compare_peers.py --methods untiled,vaepar-shard,distvae-patch --json out.json
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import importlib.util
import json
import os
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

import vaepar
from vaepar import bench, heap, launch
from vaepar.comm import Comm
from vaepar.errors import VaeparError
from vaepar.report import MemoryMeter, human_bytes
from vaepar.vae import architecture, load

METHODS = ("untiled", "vaepar-untiled", "distvae-patch", "distvae-tiled", "vaepar-shard", "vaepar-tiled")
ONE_WORKER = ("untiled", "vaepar-untiled")
HUGE_PAGES = ("vaepar", "all", "none")
SEED = 0


@dataclass(frozen=True, kw_only=True, slots=True)
class Settings:
    """What every worker needs to know: the input, the timing and the tile."""

    resolution: int
    threads: int
    repeats: int
    warmup: int
    tile_size: int
    methods: tuple[str, ...]
    rounds: int = 1
    huge_pages: str = "vaepar"


@dataclass(kw_only=True, slots=True)
class MethodResult:
    """One method's measurements (rank 0's view)."""

    method: str
    workers: int
    threads: int
    seconds: float | None = None
    times: list[float] = field(default_factory=list)  # every timed decode of every launch
    peak_mem_bytes: list[int] = field(default_factory=list)  # per rank, rank order (median over launches)
    launch_seconds: list[float] = field(default_factory=list)  # each launch's median, in launch order
    launch_peaks: list[int] = field(default_factory=list)  # each launch's max-rank peak
    huge_pages: bool = False  # its workers ran with heap.TORCH_ENV
    max_abs_err: float | None = None
    note: str = ""


# ---------------------------------------------------------------------------------------------
# Building the model and the methods (every rank runs these)
# ---------------------------------------------------------------------------------------------

def fresh_vae() -> torch.nn.Module:
    """The SD-VAE architecture with vaepar's seeded random weights: the same on every rank."""
    return load(architecture("sd-vae"), torch.device("cpu"), torch.float32)


def latents(resolution: int) -> torch.Tensor:
    """Seeded latents for a ``resolution``² image (the same on every rank)."""
    shape = (1, 4, resolution // 8, resolution // 8)
    return torch.randn(shape, generator=torch.Generator().manual_seed(SEED))


def prepare_untiled(vae: torch.nn.Module, settings: Settings) -> torch.nn.Module:
    """diffusers as it comes: no tiling, no parallelism."""
    return vae


def prepare_vaepar_untiled(vae: torch.nn.Module, settings: Settings) -> torch.nn.Module:
    """vaepar on one worker: the VAE's own decode, with vaepar's in-place activations."""
    return vaepar.parallelize(vae)


def prepare_distvae_patch(vae: torch.nn.Module, settings: Settings) -> torch.nn.Module:
    """Swap the decoder for DistVAE's row-split DecoderAdapter on the default (WORLD) group."""
    from distvae.vae import parallelize_decoder

    parallelize_decoder(vae, None)
    return vae


def prepare_distvae_tiled(vae: torch.nn.Module, settings: Settings) -> torch.nn.Module:
    """Enable diffusers' tiling at ``tile_size`` and install DistVAE's tile-dealing tiled_decode."""
    import torch.distributed as dist
    from distvae.vae import apply_tile_plan, sharing, tile_shape_plan, tiled_decode_for

    vae.enable_tiling()
    plan = tile_shape_plan(vae, settings.tile_size, settings.tile_size)
    if plan is None:
        raise ValueError(f"DistVAE cannot plan a {settings.tile_size}-pixel tile for this VAE")
    apply_tile_plan(vae, plan)
    dispatch, assemble = sharing(dist.group.WORLD)
    decode = tiled_decode_for(vae, dispatch, assemble)
    if decode is None:
        raise ValueError("DistVAE has no tile-parallel decode for this VAE")
    vae.tiled_decode = decode
    return vae


def prepare_vaepar_shard(vae: torch.nn.Module, settings: Settings) -> torch.nn.Module:
    return vaepar.parallelize(vae, strategy="shard")


def prepare_vaepar_tiled(vae: torch.nn.Module, settings: Settings) -> torch.nn.Module:
    return vaepar.parallelize(vae, strategy="tiled", tile_size=settings.tile_size)


PREPARE: dict[str, Callable[[torch.nn.Module, Settings], torch.nn.Module]] = {
    "untiled": prepare_untiled,
    "vaepar-untiled": prepare_vaepar_untiled,
    "distvae-patch": prepare_distvae_patch,
    "distvae-tiled": prepare_distvae_tiled,
    "vaepar-shard": prepare_vaepar_shard,
    "vaepar-tiled": prepare_vaepar_tiled,
}


# ---------------------------------------------------------------------------------------------
# Measuring (every rank runs these, collectively)
# ---------------------------------------------------------------------------------------------

@dataclass(kw_only=True, slots=True)
class RankRun:
    """One rank's share of one method: its times, its peak, rank 0's output."""

    times: list[float] = field(default_factory=list)
    peak: int = 0
    output: torch.Tensor | None = None
    error: str = ""


@torch.inference_mode()
def timed_decodes(vae: torch.nn.Module, z: torch.Tensor, settings: Settings, comm: Comm) -> RankRun:
    """``warmup + repeats`` decodes between barriers of ``comm``: the timed ones' seconds and peak RSS."""
    sync = comm.barrier
    meter, run = MemoryMeter(torch.device("cpu")), RankRun()
    for i in range(settings.warmup + settings.repeats):
        sync()
        meter.start()
        t0 = time.perf_counter()
        out = vae.decode(z).sample
        sync()
        seconds = time.perf_counter() - t0
        if i >= settings.warmup:
            run.times.append(seconds)
            run.peak = max(run.peak, meter.peak())
        run.output = out
    return run


def run_method(method: str, z: torch.Tensor, settings: Settings, comm: Comm) -> RankRun:
    """Build a fresh VAE, prepare it for ``method`` and time it; a failure is kept, not raised
    (every rank fails alike for a planning error, before any collective)."""
    try:
        vae = PREPARE[method](fresh_vae(), settings)
        return timed_decodes(vae, z, settings, comm)
    except Exception as exc:  # noqa: BLE001 - a peer's failure is reported, not fatal
        return RankRun(error=f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    finally:
        gc.collect()


def summarise(method: str, launches: list[dict[str, Any]], reference: torch.Tensor | None,
              settings: Settings) -> MethodResult:
    """The row for ``method`` from its launches (each: every rank's output-free run, rank 0's
    output): times pooled over the launches, per-rank peaks the median over the launches."""
    result = MethodResult(method=method, workers=len(launches[0]["runs"]), threads=settings.threads,
                          huge_pages=uses_huge_pages(method, settings))
    errors = sorted({r.error for one in launches for r in one["runs"] if r.error})
    if errors:
        result.note = "; ".join(errors)
        return result
    for one in launches:
        runs = one["runs"]
        result.times += runs[0].times
        result.launch_seconds.append(statistics.median(runs[0].times))
        result.launch_peaks.append(max(r.peak for r in runs))
    result.seconds = statistics.median(result.times)
    per_rank = zip(*([r.peak for r in one["runs"]] for one in launches))
    result.peak_mem_bytes = [int(statistics.median(peaks)) for peaks in per_rank]
    output = launches[-1]["output"]
    if reference is not None and output is not None:
        result.max_abs_err = float((output.float() - reference.float()).abs().max())
    return result


def worker_main(method: str, settings: Settings) -> dict[str, Any]:
    """Every rank of one method's own launch: join the group, time the method; rank 0 returns
    every rank's measurements and its output."""
    comm = Comm.join("cpu")  # initialises the default gloo group from the launcher's environment
    torch.set_num_threads(settings.threads)
    try:
        mine = run_method(method, latents(settings.resolution), settings, comm)
        runs = comm.gather_all(RankRun(times=mine.times, peak=mine.peak, error=mine.error))
    finally:
        comm.close()
    return {"runs": runs, "output": mine.output}


def measure(method: str, settings: Settings, nproc: int) -> dict[str, Any]:
    """One method in a launch of its own (fresh worker processes: no allocator state or heap left
    by another method changes its time or its peak RSS), in its allocator environment."""
    workers = 1 if method in ONE_WORKER else nproc
    with environment(worker_env(uses_huge_pages(method, settings))):
        return launch.run(launch.LaunchSpec(nproc=workers), worker_main, method, settings, isolated=True)


def uses_huge_pages(method: str, settings: Settings) -> bool:
    """Whether ``method``'s workers get :data:`vaepar.heap.TORCH_ENV` (``--huge-pages``)."""
    return settings.huge_pages == "all" or (settings.huge_pages == "vaepar" and method.startswith("vaepar"))


def worker_env(huge_pages: bool) -> dict[str, str | None]:
    """The variables of :data:`vaepar.heap.TORCH_ENV`, set, or unset (None) for torch's default."""
    return {key: value if huge_pages else None for key, value in heap.TORCH_ENV.items()}


@contextmanager
def environment(changes: dict[str, str | None]) -> Iterator[None]:
    """Within: ``changes`` in this process's environment (the spawned workers inherit it)."""
    saved = {key: os.environ.get(key) for key in changes}
    try:
        _set_env(changes)
        yield
    finally:
        _set_env(saved)


def _set_env(values: dict[str, str | None]) -> None:
    for key, value in values.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def launch_order(methods: tuple[str, ...], rounds: int) -> list[str]:
    """Every method once per round, the order reversed every other round (A B, B A, ...), so a
    drift in the machine's speed over the run weighs on every method alike."""
    return [m for r in range(rounds) for m in (methods if r % 2 == 0 else methods[::-1])]


def compare(settings: Settings, nproc: int) -> dict[str, Any]:
    """Every method in its launches; the errors against the untiled decode (run untimed when not
    asked for)."""
    done: dict[str, list[dict[str, Any]]] = {m: [] for m in settings.methods}
    for method in launch_order(settings.methods, settings.rounds):
        done[method].append(measure(method, settings, nproc))
    if "untiled" not in done:
        quick = Settings(**{**asdict(settings), "repeats": 1, "warmup": 0})
        done["untiled"] = [measure("untiled", quick, nproc)]
    reference = done["untiled"][-1]["output"]
    results = [summarise(m, done[m], reference, settings) for m in settings.methods]
    outputs = {m: done[m][-1]["output"] for m in settings.methods}
    scale = None if reference is None else float(reference.abs().max())
    return {"results": [asdict(r) for r in results], "cross": cross_errors(outputs), "reference_max_abs": scale}


def cross_errors(outputs: dict[str, torch.Tensor | None]) -> dict[str, float]:
    """max |a - b| between the two libraries' results of the same kind (tiled, banded)."""
    pairs = (("distvae-tiled", "vaepar-tiled"), ("distvae-patch", "vaepar-shard"))
    out = {}
    for a, b in pairs:
        if outputs.get(a) is not None and outputs.get(b) is not None:
            out[f"{a} vs {b}"] = float((outputs[a] - outputs[b]).abs().max())
    return out


# ---------------------------------------------------------------------------------------------
# The command line (the launching process)
# ---------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--resolution", type=int, default=512, help="image height = width in pixels")
    ap.add_argument("--nproc", type=int, default=2, help="workers for the parallel methods")
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads per worker")
    ap.add_argument("--repeats", type=int, default=3, help="timed decodes per launch")
    ap.add_argument("--warmup", type=int, default=1, help="untimed decodes per launch first")
    ap.add_argument("--rounds", type=int, default=1,
                    help="launches per method, the order reversed every other round")
    ap.add_argument("--tile-size", type=int, default=256, help="tile edge in pixels (both tiled methods)")
    ap.add_argument("--huge-pages", choices=HUGE_PAGES, default="vaepar",
                    help="whose workers run with THP_MEM_ALLOC_ENABLE=1: vaepar's methods (as the vaepar "
                         "command runs them; the others with torch's default), all or none")
    ap.add_argument("--json", type=Path, default=None, help="also write the raw results here")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"comma list from {', '.join(METHODS)}")
    args = ap.parse_args(argv)
    args.methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    bad = [m for m in args.methods if m not in METHODS]
    if bad or not args.methods:
        ap.error(f"unknown methods {bad}; choose from {', '.join(METHODS)}")
    args.methods = tuple(m for m in METHODS if m in args.methods)  # the fixed order
    if args.resolution % 8 or args.resolution <= 0 or args.tile_size % 8 or args.tile_size <= 0:
        ap.error("--resolution and --tile-size must be positive multiples of 8")
    if args.nproc < 2 or min(args.threads, args.repeats, args.rounds) < 1 or args.warmup < 0:
        ap.error("--nproc must be at least 2, --threads, --repeats and --rounds at least 1, --warmup at least 0")
    return args


def require_distvae(methods: tuple[str, ...]) -> None:
    """Exit with one line when a DistVAE method is asked for and DistVAE is not installed."""
    if any(m.startswith("distvae") for m in methods) and importlib.util.find_spec("distvae") is None:
        sys.exit("compare_peers: DistVAE is not installed; run `pip install --no-deps distvae==0.1.0` "
                 "(or leave the distvae-* methods out of --methods)")


def versions() -> dict[str, str]:
    names = ("torch", "diffusers", "distvae")
    out = {}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "-"
    return out


def spread(values: list[float], unit: Callable[[float], str]) -> str:
    """``min–max`` of the launches' figures (one launch: just its figure)."""
    if not values:
        return "-"
    low, high = min(values), max(values)
    return unit(low) if low == high else f"{unit(low)} – {unit(high)}"


def print_table(doc: dict[str, Any]) -> None:
    """The plain table, then the command, the machine and the cross-library differences. With
    several rounds: the median over every timed decode and, per rank, over the launches, then the
    range of the launches' own medians and max-rank peaks."""
    several = doc["rounds"] > 1
    header = ("method", "workers", "threads", "median s", "peak mem (max rank)", "peak mem per rank",
              "max abs err") + (("launch medians s", "launch peaks") if several else ())
    rows = [header]
    for r in doc["results"]:
        peaks = r["peak_mem_bytes"]
        rows.append((
            r["method"], str(r["workers"]), str(r["threads"]),
            "-" if r["seconds"] is None else f"{r['seconds']:.3f}",
            human_bytes(max(peaks)) if peaks else "-",
            " / ".join(human_bytes(p) for p in peaks) if peaks else "-",
            "-" if r["max_abs_err"] is None else f"{r['max_abs_err']:.3g}",
        ) + ((spread(r["launch_seconds"], lambda v: f"{v:.2f}"),
              spread(r["launch_peaks"], lambda v: human_bytes(int(v)))) if several else ()))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for n, row in enumerate(rows):
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
        if n == 0:
            print("  ".join("-" * w for w in widths))
    for r in doc["results"]:
        if r["note"]:
            print(f"{r['method']} failed: {r['note']}")
    for pair, err in doc["cross"].items():
        print(f"max abs diff {pair}: {err:.3g}")
    if doc["reference_max_abs"] is not None:
        print(f"max |untiled output| (the scale of the errors): {doc['reference_max_abs']:.3g}")
    print(f"input: {doc['resolution']}x{doc['resolution']} px, latents {doc['latent_shape']}, "
          f"tile {doc['tile_size']} px (overlap 0.25); repeats {doc['repeats']}, warmup {doc['warmup']}, "
          f"{doc['rounds']} launch(es) per method")
    huge = [r["method"] for r in doc["results"] if r["huge_pages"]]
    print(f"huge pages ({', '.join(f'{k}={v}' for k, v in heap.TORCH_ENV.items())}): {', '.join(huge) or 'none'}")
    print(f"machine: {doc['machine']}")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in doc["versions"].items()))
    print(f"command: {doc['command']}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    require_distvae(args.methods)
    settings = Settings(resolution=args.resolution, threads=args.threads, repeats=args.repeats,
                        warmup=args.warmup, tile_size=args.tile_size, methods=args.methods, rounds=args.rounds,
                        huge_pages=args.huge_pages)
    try:
        out = compare(settings, args.nproc)
    except VaeparError as exc:
        sys.exit(f"compare_peers: {exc}")
    doc = {**out, "resolution": args.resolution, "latent_shape": list(latents(args.resolution).shape),
           "tile_size": args.tile_size, "repeats": args.repeats, "warmup": args.warmup, "rounds": args.rounds,
           "nproc": args.nproc, "threads": args.threads, "machine": bench.device_name("cpu"),
           "versions": versions(),
           "command": shlex.join([sys.executable, *sys.argv] if argv is None else ["compare_peers.py", *argv])}
    print_table(doc)
    if args.json is not None:
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
