"""The worker side of ``vaepar serve``: a warm group that runs one request at a time.

Every rank runs :func:`serve`: it loads the VAE once (:class:`~vaepar.worker.Worker`), then loops.
Rank 0 receives :class:`Job` messages from the server process over a pipe, broadcasts each job's
description and tensor to the other ranks, all ranks run it on the engine, and rank 0 sends back
a :class:`Reply` holding the finished HTTP response. While no job comes, rank 0 broadcasts a tick
every :data:`TICK_S` seconds, so that the others never wait in a collective long enough to time out
and a lost peer is noticed while idle too.

Messages hold plain data only (bytes, numbers, dataclasses): tensors cross the pipe as
:class:`Blob` bytes, never through torch's shared-memory pickling.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection
from pathlib import Path

import torch

from vaepar import outputs, protocol
from vaepar.errors import VaeparError
from vaepar.latents import Factors
from vaepar.report import RankStats, Stopwatch
from vaepar.worker import Done, Worker, WorkerConfig

TICK_S = 2.0
STOP = "stop"


@dataclass(frozen=True, kw_only=True, slots=True)
class Blob:
    """A tensor as raw bytes, shape and dtype name."""

    data: bytes
    shape: tuple[int, ...]
    dtype: str

    @staticmethod
    def of(t: torch.Tensor) -> Blob:
        t = t.detach().cpu().contiguous()
        return Blob(data=t.view(torch.uint8).numpy().tobytes(), shape=tuple(t.shape),
                    dtype=str(t.dtype).removeprefix("torch."))

    def tensor(self) -> torch.Tensor:
        dtype = getattr(torch, self.dtype)
        return torch.frombuffer(bytearray(self.data), dtype=dtype).reshape(self.shape) if self.data else \
            torch.empty(self.shape, dtype=dtype)


@dataclass(frozen=True, kw_only=True, slots=True)
class Job:
    """One request for the group. Decode: ``tensor`` holds latents as ``vae.decode`` takes them
    (unpacked, unscaled), ``reply`` what to answer. Encode: ``tensor`` holds pixels in [-1, 1];
    the latents are scaled by ``factors`` and sent in ``dtype``."""

    id: int
    task: str
    tensor: Blob | None
    reply: protocol.Reply | None = None
    dtype: str = "float32"
    factors: Factors | None = None
    label: str = "request"

    def __post_init__(self) -> None:
        if self.task not in ("decode", "encode"):
            raise ValueError(f"task must be decode or encode, got {self.task!r}")


@dataclass(frozen=True, kw_only=True, slots=True)
class Ready:
    """Sent once by rank 0 when every rank has loaded the model."""

    pids: list[int]
    device: str


@dataclass(frozen=True, kw_only=True, slots=True)
class Reply:
    """Rank 0's answer to job ``id``: the HTTP response and how the job ran."""

    id: int
    response: protocol.Response
    seconds: float
    strategy: str = ""
    ranks: tuple[RankStats, ...] = ()


def serve(cfg: WorkerConfig, conn: Connection) -> None:
    """Every rank: load the model, then run jobs until rank 0 receives :data:`STOP` (or the
    server's end of the pipe closes)."""
    worker = Worker(cfg)
    try:
        pids = worker.comm.gather_all(os.getpid())
        if worker.comm.rank == 0:
            conn.send(Ready(pids=pids, device=str(worker.comm.device)))
        while (job := _next_job(worker, conn)) != STOP:
            if job is not None:
                reply = run_job(worker, job)
                if reply is not None:
                    conn.send(reply)
    finally:
        worker.close()


@dataclass(frozen=True, slots=True)
class Running:
    """A job as every rank runs it: its description and its tensor on this rank's device."""

    job: Job
    x: torch.Tensor


def _next_job(worker: Worker, conn: Connection) -> Running | str | None:
    """Collective: the next job (its tensor broadcast), :data:`STOP`, or None after an idle tick."""
    message: Job | str | None = None
    if worker.comm.rank == 0:
        try:
            message = conn.recv() if conn.poll(TICK_S) else None
        except (EOFError, OSError):
            message = STOP  # the server process is gone
    header = worker.comm.broadcast_object(replace(message, tensor=None) if isinstance(message, Job) else message)
    if not isinstance(header, Job):
        return header
    tensor = message.tensor.tensor().to(worker.dtype) if isinstance(message, Job) and message.tensor else None
    return Running(header, worker.comm.broadcast(tensor))


def run_job(worker: Worker, running: Running) -> Reply | None:
    """Collective: run one job; rank 0 returns the reply (an error reply if the result is unusable)."""
    job, clock = running.job, Stopwatch()
    try:
        if job.task == "decode":
            done = worker.decode_tensor(running.x, job.label)
            response = _decoded(done, job, worker.cfg) if done is not None else None
        else:
            done = worker.encode_tensor(worker.family.prepare_encode(running.x), job.label)
            response = _encoded(done, job) if done is not None else None
    except VaeparError as exc:  # rank 0 only: a non-finite result, after every collective
        return Reply(id=job.id, response=_error(str(exc), 500), seconds=clock.elapsed())
    if done is None or response is None:
        return None
    return Reply(id=job.id, response=response, seconds=clock.elapsed(), strategy=done.strategy,
                 ranks=tuple(done.ranks))


def _decoded(done: Done, job: Job, cfg: WorkerConfig) -> protocol.Response:
    assert job.reply is not None
    if job.reply is protocol.Reply.MP4:
        return protocol.mp4_response(mp4_bytes(done.tensor, fps=cfg.fps, quality=cfg.quality))
    return protocol.decode_response(done.tensor, job.reply, getattr(torch, job.dtype))


def _encoded(done: Done, job: Job) -> protocol.Response:
    return protocol.encode_response(done.tensor, job.factors or Factors(), getattr(torch, job.dtype))


def mp4_bytes(sample: torch.Tensor, *, fps: int, quality: int) -> bytes:
    """One video ``(1, 3, F, H, W)`` in [-1, 1] as H.264 MP4 bytes."""
    with tempfile.TemporaryDirectory(prefix="vaepar-serve-") as tmp:
        path = Path(tmp) / "video.mp4"
        outputs.write_sample(path, sample, fps=fps, quality=quality)
        return path.read_bytes()


def _error(message: str, status: int) -> protocol.Response:
    return protocol.error_response(protocol.ProtocolError(message, status))
