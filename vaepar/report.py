"""What users see: live progress on rank 0, peak memory per rank, the final table and JSON."""

from __future__ import annotations

import gc
import json
import os
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from vaepar import heap
from vaepar.comm import Comm


def _status_bytes(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024
    return 0


class MemoryMeter:
    """Peak memory of one job: CUDA allocator peak, or CPU peak RSS above the job's baseline."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.baseline = 0

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        gc.collect()
        heap.trim()  # so that a job reusing freed heap pages still shows in RSS
        try:  # writing 5 resets the kernel's high-water mark (VmHWM) to the current RSS
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass
        self.baseline = _status_bytes("VmRSS")

    def peak(self) -> int:
        """Bytes: allocator peak on CUDA; on CPU, peak RSS since :meth:`start` minus its baseline."""
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        return max(0, _status_bytes("VmHWM") - self.baseline)


@dataclass(kw_only=True, slots=True)
class RankStats:
    """One rank's share of one job."""

    rank: int
    device: str
    tiles: int = 0
    busy_s: float = 0.0
    peak_mem_bytes: int = 0
    band: list[int] | None = None
    exchanges: int = 0
    bytes_sent: int = 0


@dataclass(kw_only=True, slots=True)
class JobReport:
    """One input file's result, kept by rank 0.

    ``seconds``: from the job's start until the next job could start. An output's write overlaps
    the next job (and the last job waits for every write), so the jobs' seconds add up to the
    wall time.
    """

    input: str
    outputs: list[str]
    input_shape: list[int]
    output_shape: list[int]
    strategy: str
    tiles: int
    seconds: float
    ranks: list[RankStats] = field(default_factory=list)


class Ticker:
    """Counts finished work units (tiles or tile-frames) across ranks; rank 0 draws the bar.

    Other ranks add to a counter in the group's store; a thread on rank 0 polls it through its
    own store connection, so the main thread never waits on the bar.
    """

    def __init__(self, comm: Comm, key: str, total: int, label: str, show: bool) -> None:
        self.comm, self.key, self.local, self.show = comm, key, 0, show
        self._progress: Progress | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if comm.rank == 0 and show:
            self._progress = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("tiles"), TimeElapsedColumn(), console=Console(stderr=True),
            )
            self._task = self._progress.add_task(label, total=total)
            self._progress.start()
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()

    def tick(self, n: int = 1) -> None:
        if self.comm.rank == 0:
            self.local += n
        elif self.show:
            self.comm.add(self.key, n)

    def _poll(self) -> None:
        store = _store_client() if self.comm.world > 1 else None
        while not self._stop.wait(0.1):
            self._draw(store)
        self._draw(store)

    def _draw(self, store: Any) -> None:
        others = int(store.add(self.key, 0)) if store is not None else 0
        assert self._progress is not None
        self._progress.update(self._task, completed=self.local + others)

    def close(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
        if self._progress is not None:
            self._progress.stop()


def _store_client() -> Any:
    import torch.distributed as dist
    from datetime import timedelta

    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                          timeout=timedelta(minutes=10), wait_for_workers=False)
    return dist.PrefixStore("vaepar", store)


def human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def print_summary(reports: list[JobReport], console: Console, verbose: bool = False) -> None:
    """Outputs written, then per-rank time and peak memory over all jobs."""
    for r in reports:
        parts = "bands" if r.strategy in ("shard", "patch") else "tiles"
        console.print(f"{r.input} -> {', '.join(r.outputs)}  ({r.strategy}, {r.tiles} {parts}, {r.seconds:.2f} s)")
        if verbose:
            for s in r.ranks:
                if s.band is not None:
                    console.print(f"  rank {s.rank}: band rows {s.band[0]}:{s.band[1]}, {s.exchanges} halo "
                                  f"exchanges, {human_bytes(s.bytes_sent)} sent")
    table = Table(title="per-rank work and peak memory")
    for col in ("rank", "device", "tiles", "busy s", "peak memory"):
        table.add_column(col, justify="right" if col != "device" else "left")
    nranks = len(reports[0].ranks) if reports else 0
    for k in range(nranks):
        stats = [r.ranks[k] for r in reports]
        table.add_row(str(k), stats[0].device, str(sum(s.tiles for s in stats)),
                      f"{sum(s.busy_s for s in stats):.2f}", human_bytes(max(s.peak_mem_bytes for s in stats)))
    console.print(table)
    console.print(f"wall time {sum(r.seconds for r in reports):.2f} s")


def write_json(path: Path, reports: list[JobReport], extra: dict[str, Any]) -> None:
    """The machine-readable summary: inputs, outputs, timings, per-rank peak memory."""
    write_doc(path, {**extra, "jobs": [asdict(r) for r in reports],
                     "peak_mem_bytes": max((s.peak_mem_bytes for r in reports for s in r.ranks), default=0)})


def write_doc(path: Path, doc: dict[str, Any]) -> None:
    from vaepar.outputs import atomic_write_bytes

    atomic_write_bytes(path, (json.dumps(doc, indent=2) + "\n").encode())


def _num(v: float | None, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def print_bench(doc: dict[str, Any], console: Console) -> None:
    """The measured table: one row per strategy and worker count."""
    table = Table(title=f"vaepar bench: {doc['model']}, {doc['task']} latents {doc['latent_shape']}, "
                        f"{doc['dtype']}, on {doc['device']}")
    for col in ("strategy", "n", "median s", "peak mem", "speedup", "eff.", "max|err|", "work"):
        table.add_column(col, justify="left" if col == "strategy" else "right", no_wrap=True)
    for r in doc["runs"]:
        mem = r["peak_mem_bytes"]
        table.add_row(r["strategy"], str(r["nproc"]), _num(r["seconds"], ".3f"),
                      "-" if mem is None else human_bytes(mem), _num(r["speedup"], ".2f"),
                      _num(r["efficiency"], ".2f"), _num(r["max_abs_err"], ".1e"), _num(r["work"] or None, ".2f"))
    console.print(table)
    for r in doc["runs"]:
        if r["note"]:
            console.print(f"{r['strategy']} x{r['nproc']}: {r['note']}")
    for note in doc["notes"]:
        console.print(f"note: {note}")


def print_plan(rows: list[dict[str, Any]], bench: Any, console: Console) -> None:
    """The predicted table of ``vaepar bench --plan``."""
    table = Table(title=f"vaepar plan: {bench.cfg.model.name}, {bench.task} latents {list(bench.latent_shape)}, "
                        f"{bench.cfg.dtype} (nothing computed)")
    for col in ("strategy", "n", "imbalance", "work", "sent/rank", "hidden", "exchanges", "attention/rank",
                "activations/rank"):
        table.add_column(col, justify="left" if col == "strategy" else "right", no_wrap=True)
    for r in rows:
        table.add_row(r["strategy"], str(r["nproc"]), f"{r['imbalance']:.2f}", f"{r['work']:.2f}",
                      human_bytes(r["bytes_sent_per_rank"]), human_bytes(r["bytes_overlapped_per_rank"]),
                      str(r["exchanges"]), human_flops(r["attention_flops_per_rank"]),
                      human_bytes(r["activation_bytes_per_rank"]))
    console.print(table)
    console.print("imbalance: heaviest rank's work over the mean; sent/rank: halo strips or halo rows plus "
                  "the rank's part of the result; hidden: the halo bytes sent while the band's convolution "
                  "runs (overlapped with compute); attention/rank: floating-point operations of attention "
                  "scores and weighted values on the busiest rank; activations: largest layer input + output "
                  "on the busiest rank (an estimate of the activation peak, weights excluded; frame-by-frame "
                  "video models: per frame step)")


def human_flops(n: float) -> str:
    """Floating-point operations with an SI prefix: ``40.8 GFLOP``."""
    for unit in ("", "K", "M", "G", "T", "P"):
        if abs(n) < 1000 or unit == "P":
            return f"{n:.0f} FLOP" if unit == "" else f"{n:.1f} {unit}FLOP"
        n /= 1000
    raise AssertionError("unreachable")


class Stopwatch:
    def __init__(self) -> None:
        self.t0 = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0
