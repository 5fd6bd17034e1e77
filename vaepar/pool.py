"""A warm worker group for ``vaepar serve``: started once, fed one job at a time, restarted on failure.

:class:`Pool` starts the group through :func:`vaepar.launch.run` (torch's elastic launcher, even for
one worker, so that the server outlives its workers) and talks to rank 0 over a pipe
(:mod:`vaepar.service`). One controller thread owns the pipe: it takes jobs from a bounded queue,
sends each to rank 0 and waits for the reply, bounded by ``job_timeout``. When the group ends
(a worker died or was killed), the job in flight and those waiting fail with :class:`Unavailable`
(HTTP 503) and a new group is started, while new jobs are refused until it is ready.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import signal
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from multiprocessing.connection import Connection

from vaepar import launch, service
from vaepar.errors import InternalError, VaeparError
from vaepar.service import Job, Ready, Reply
from vaepar.worker import WorkerConfig

POLL_S = 0.1
RESTART_PAUSE_S = 1.0
STOP_WAIT_S = 30.0


class Unavailable(Exception):
    """The group cannot take this job now (queue full, restarting, shutting down): HTTP 503."""


@dataclass(kw_only=True, slots=True)
class Generation:
    """One start of the worker group: the pipe to its rank 0, and whether it has ended."""

    conn: Connection
    ended: threading.Event = field(default_factory=threading.Event)
    error: str = ""
    pids: list[int] = field(default_factory=list)

    def kill(self) -> None:
        """SIGKILL every worker: the launcher notices and ends the group."""
        for pid in self.pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


class Pool:
    """The worker group behind a server, and the bounded queue in front of it."""

    def __init__(self, spec: launch.LaunchSpec, cfg: WorkerConfig, *, max_queue: int, job_timeout: float) -> None:
        if max_queue < 1:
            raise ValueError(f"max_queue must be at least 1, got {max_queue}")
        self.spec, self.cfg, self.job_timeout = spec, cfg, job_timeout
        self.max_queue = max_queue
        self._waiting: queue.Queue[tuple[Job, Future[Reply]]] = queue.Queue(maxsize=max_queue)
        self._generation: Generation | None = None
        self._closing = threading.Event()
        self._ready = threading.Event()
        self._first_error = ""
        self._thread = threading.Thread(target=self._control, name="vaepar-pool", daemon=True)
        self.in_flight: Job | None = None
        self.restarts = 0
        self.last_reply: Reply | None = None
        self.started_at = time.monotonic()

    # --- the server's side -----------------------------------------------------------------

    def start(self) -> None:
        """Start the group and wait until every worker has loaded the model; a failure to come up
        the first time is raised (:class:`VaeparError`), later ones are retried."""
        self._thread.start()
        self._ready.wait()
        if self._first_error:
            self._thread.join()
            raise VaeparError(self._first_error)

    def submit(self, job: Job) -> Future[Reply]:
        """Queue ``job``; its future gets the reply or :class:`Unavailable`."""
        if self._closing.is_set():
            raise Unavailable("the server is shutting down")
        if self._generation is None:
            raise Unavailable("the worker group is restarting")
        future: Future[Reply] = Future()
        try:
            self._waiting.put_nowait((job, future))
        except queue.Full:
            raise Unavailable(f"the queue is full ({self.max_queue} requests waiting)") from None
        return future

    def drain(self) -> None:
        """Stop taking jobs and refuse those waiting; the one in flight finishes."""
        self._closing.set()
        self._reject_waiting("the server is shutting down")

    def close(self) -> None:
        """Drain, stop the workers (SIGKILL after :data:`STOP_WAIT_S`) and wait for them to exit."""
        self.drain()
        if self._thread.is_alive():
            self._thread.join()

    @property
    def state(self) -> str:
        """ok, degraded (queue full), restarting, or stopping."""
        if self._closing.is_set():
            return "stopping"
        if self._generation is None:
            return "restarting"
        return "degraded" if self._waiting.full() else "ok"

    @property
    def waiting(self) -> int:
        return self._waiting.qsize()

    @property
    def pids(self) -> list[int]:
        """The worker processes, in rank order (empty while restarting)."""
        generation = self._generation
        return list(generation.pids) if generation is not None else []

    # --- the controller thread -------------------------------------------------------------

    def _control(self) -> None:
        while not self._closing.is_set():
            generation = self._start_generation()
            if generation is None:
                if not self._ready.is_set():
                    self._ready.set()
                    return
                self._closing.wait(RESTART_PAUSE_S)
                continue
            self._generation = generation
            self._ready.set()
            self._run_jobs(generation)
            self._generation = None
            if self._closing.is_set():
                self._stop(generation)
                break
            self.restarts += 1
            self._reject_waiting("a worker failed; the worker group is restarting")
        self._ready.set()
        self._reject_waiting("the server is shutting down")

    def _start_generation(self) -> Generation | None:
        """Launch a group and wait for its rank 0's :class:`Ready` (None if it ended first)."""
        ours, theirs = multiprocessing.get_context("spawn").Pipe()
        generation = Generation(conn=ours)
        threading.Thread(target=self._launch, args=(generation, theirs), name="vaepar-group", daemon=True).start()
        while not generation.ended.is_set():
            if ours.poll(POLL_S):
                ready = ours.recv()
                assert isinstance(ready, Ready), ready
                generation.pids = ready.pids
                theirs.close()  # the workers hold their copies: a dead rank 0 now closes the pipe
                return generation
        if not self._ready.is_set():
            self._first_error = generation.error or "the worker group ended before it was ready"
        return None

    def _launch(self, generation: Generation, theirs: Connection) -> None:
        try:
            launch.run(self.spec, service.serve, self.cfg, theirs, isolated=True)
        except (VaeparError, InternalError) as exc:
            generation.error = str(exc)
        except Exception as exc:  # noqa: BLE001 - reported as the group's failure, never raised in a thread
            generation.error = f"{type(exc).__name__}: {exc}"
        finally:
            generation.ended.set()

    def _run_jobs(self, generation: Generation) -> None:
        while not generation.ended.is_set() and not self._closing.is_set():
            try:
                job, future = self._waiting.get(timeout=POLL_S)
            except queue.Empty:
                continue
            if not future.set_running_or_notify_cancel():
                continue
            self.in_flight = job
            try:
                future.set_result(self._run_one(generation, job))
            except Unavailable as exc:
                future.set_exception(exc)
            finally:
                self.in_flight = None

    def _run_one(self, generation: Generation, job: Job) -> Reply:
        """Send ``job`` to rank 0 and wait for its reply, the group's end, or the time limit."""
        deadline = time.monotonic() + self.job_timeout
        try:
            generation.conn.send(job)
            while time.monotonic() < deadline:
                if generation.conn.poll(POLL_S):
                    reply = generation.conn.recv()
                    assert isinstance(reply, Reply) and reply.id == job.id, reply
                    self.last_reply = reply
                    return reply
                if generation.ended.is_set():
                    break
        except (EOFError, OSError):
            pass
        if not generation.ended.is_set() and time.monotonic() >= deadline:
            generation.kill()
            raise Unavailable(f"the request ran over the {self.job_timeout:g} s limit; the worker group is restarting")
        generation.ended.wait(STOP_WAIT_S)
        why = f": {generation.error}" if generation.error else ""
        raise Unavailable(f"a worker failed during this request{why}; the worker group is restarting")

    def _stop(self, generation: Generation) -> None:
        try:
            generation.conn.send(service.STOP)
        except OSError:
            pass
        if not generation.ended.wait(STOP_WAIT_S):
            generation.kill()
            generation.ended.wait(STOP_WAIT_S)

    def _reject_waiting(self, why: str) -> None:
        while True:
            try:
                _, future = self._waiting.get_nowait()
            except queue.Empty:
                return
            if future.set_running_or_notify_cancel():
                future.set_exception(Unavailable(why))
