"""Starting workers: in-process for one, torch's elastic launcher (c10d rendezvous) for more.

vaepar's ranks follow ``--node-rank``, not the rendezvous: torch numbers nodes by (host name, pid),
so every worker first meets the others in the rendezvous store (:func:`meet`), posts its node rank,
local rank and any failure of its node, and takes the rank of its place in (node rank, local rank)
order. Global rank 0 is therefore local rank 0 of the node started with ``--node-rank 0``. A node
whose validation failed still joins, so that every node stops within seconds with one line.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from vaepar.errors import InternalError, OptionError, VaeparError

# The distributed environment of an outer job (torchrun, SLURM + torchrun, accelerate): vaepar's
# own group must never join it.
OUTER_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
             "ROLE_RANK", "ROLE_NAME", "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
NODE_RANK_ENV = "VAEPAR_NODE_RANK"
# How a collective fails when a peer process died: not a bug of this worker.
PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "DistNetworkError",
             "NCCL communicator was aborted", "recvBytes failed", "Failed to recv")
MEET_TIMEOUT = timedelta(minutes=2)


@dataclass(frozen=True, kw_only=True, slots=True)
class LaunchSpec:
    """How many workers, on how many nodes, meeting where."""

    nproc: int = 1
    nnodes: int = 1
    node_rank: int = 0
    rdzv_endpoint: str | None = None
    rdzv_id: str | None = None

    def __post_init__(self) -> None:
        if self.nproc < 1:
            raise OptionError(f"--nproc must be at least 1, got {self.nproc}")
        if self.nnodes < 1:
            raise OptionError(f"--nnodes must be at least 1, got {self.nnodes}")
        if not 0 <= self.node_rank < self.nnodes:
            raise OptionError(f"--node-rank must be in [0, {self.nnodes}), got {self.node_rank}")
        if self.nnodes > 1 and not self.rdzv_endpoint:
            raise OptionError("several nodes need --rdzv-endpoint HOST:PORT (the same on every node)")

    @property
    def world(self) -> int:
        return self.nproc * self.nnodes


def default_threads(nproc: int) -> int:
    """Intra-op threads per CPU worker so that workers x threads = cores."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // nproc)


def run(spec: LaunchSpec, fn: Callable[..., Any], *args: Any, isolated: bool = False) -> Any:
    """Run ``fn(*args)`` on every worker; return global rank 0's result (None on other nodes).

    One worker runs in this process unless ``isolated`` (a server keeps its workers apart, so that
    it outlives them). A worker that fails ends the whole group: a user error comes back as a
    :class:`VaeparError`, anything else as an :class:`InternalError`.
    """
    with own_environment():
        if spec.world == 1 and not isolated:
            return fn(*args)
        results = _launch(spec, None, fn, args)
    return next((value for rank, value in results if rank == 0), None)


def announce_failure(spec: LaunchSpec, message: str) -> None:
    """Tell the other nodes that this one failed before its job could start, so that they stop
    at once (each prints which node failed) instead of waiting for the rendezvous to time out."""
    if spec.nnodes == 1:
        return
    single = LaunchSpec(nproc=1, nnodes=spec.nnodes, node_rank=spec.node_rank,
                        rdzv_endpoint=spec.rdzv_endpoint, rdzv_id=spec.rdzv_id)
    with own_environment():
        try:
            _launch(single, message, None, ())
        except (VaeparError, InternalError):
            pass  # this node's own line is printed by the caller


@contextmanager
def announcing(spec: LaunchSpec) -> Iterator[None]:
    """Within this block, a :class:`VaeparError` is announced to the other nodes, then re-raised."""
    try:
        yield
    except VaeparError as exc:
        announce_failure(spec, str(exc))
        raise


@contextmanager
def own_environment() -> Iterator[None]:
    """Hide an outer job's distributed variables (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``,
    ``TORCHELASTIC_*``, ...) while vaepar starts its own group; restore them afterwards."""
    hidden = {k: os.environ.pop(k) for k in list(os.environ)
              if k in OUTER_ENV or k.startswith("TORCHELASTIC_") or k == NODE_RANK_ENV}
    try:
        yield
    finally:
        os.environ.update(hidden)


def _launch(spec: LaunchSpec, failure: str | None, fn: Callable[..., Any] | None,
            args: tuple[Any, ...]) -> list[tuple[int, Any]]:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    _quiet_launcher_logs()
    config = LaunchConfig(
        min_nodes=spec.nnodes, max_nodes=spec.nnodes, nproc_per_node=spec.nproc,
        rdzv_backend="c10d", rdzv_endpoint=spec.rdzv_endpoint or "localhost:0",
        rdzv_configs={"is_host": spec.node_rank == 0} if spec.nnodes > 1 else {},
        run_id=spec.rdzv_id or ("vaepar" if spec.nnodes > 1 else uuid.uuid4().hex),
        max_restarts=0, monitor_interval=0.1, start_method="spawn",
    )
    try:
        results = elastic_launch(config, _entry)(spec.node_rank, os.getpid(), failure, fn, args)
    except ChildFailedError as exc:
        raise _failure(exc, spec) from None
    except Exception as exc:  # rendezvous errors, timeouts, ...
        raise VaeparError(f"worker group failed: {type(exc).__name__}: {exc}") from None
    return list(results.values())


def _entry(node_rank: int, parent: int, failure: str | None, fn: Callable[..., Any] | None,
           args: tuple[Any, ...]) -> tuple[int, Any]:
    """Every worker process: tie its life to vaepar's, meet the others, take its rank, run."""
    die_with_parent(parent)
    rank = meet(node_rank, failure)
    os.environ["RANK"], os.environ[NODE_RANK_ENV] = str(rank), str(node_rank)
    assert fn is not None, "a failing node's workers stop in meet()"
    return rank, fn(*args)


def die_with_parent(parent: int) -> None:
    """End this process as soon as ``parent`` (the vaepar process) dies, by any signal: the
    kernel's parent-death signal on Linux, else a thread that watches the parent."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()
    if os.getppid() != parent:  # the parent died before the signal was armed
        os._exit(1)


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(1)


def meet(node_rank: int, failure: str | None) -> int:
    """Post (node rank, local rank, failure) to the rendezvous store, wait for every worker's, and
    return this worker's rank in (node rank, local rank) order; raise if any node failed."""
    import torch.distributed as dist

    world, me = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    store = dist.PrefixStore("vaepar/meet", dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
        timeout=MEET_TIMEOUT, wait_for_workers=False))
    store.set(str(me), json.dumps([node_rank, int(os.environ["LOCAL_RANK"]), failure]))
    keys = [str(r) for r in range(world)]
    try:
        store.wait(keys)
    except Exception:  # noqa: BLE001 - the store raises bare RuntimeErrors on time-out
        raise VaeparError(f"not every node's workers arrived within {MEET_TIMEOUT.seconds} s") from None
    seen = [tuple(json.loads(store.get(k))) for k in keys]
    if any(why for *_, why in seen):  # stay until all have read: node 0's exit takes the store along
        store.add("read", 1)
        _wait_count(store, "read", world)
    return assign_rank(seen, me)


def _wait_count(store: Any, key: str, count: int, seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while int(store.add(key, 0)) < count and time.monotonic() < deadline:
        time.sleep(0.05)


def assign_rank(seen: list[tuple[int, int, str | None]], me: int) -> int:
    """The rank of worker ``me`` among ``seen`` (node rank, local rank, failure) by (node, local).

    Raises :class:`VaeparError` when a node posted a failure (naming it) or two nodes share a rank.
    """
    own_node = seen[me][0]
    failed = sorted((node, why) for node, _, why in seen if why)
    if failed:
        node, why = failed[0]
        raise VaeparError(why if node == own_node else f"node {node} failed: {why}")
    places = sorted((node, local) for node, local, _ in seen)
    if len(set(places)) != len(places):
        nodes = sorted({node for node, local in places if places.count((node, local)) > 1})
        raise VaeparError(f"several nodes were started with --node-rank {nodes[0]}; give each node its own")
    return places.index(seen[me][:2])


def _failure(exc: Any, spec: LaunchSpec) -> Exception:
    """One worker's failure as the exception the CLI prints: user errors as they were raised."""
    _, failure = exc.get_first_failure()
    info = failure.message if isinstance(failure.message, dict) else {"message": failure.message}
    message = str(info.get("message") or "").strip()
    for prefix in ("VaeparError: ", "vaepar.errors.VaeparError: ", "OptionError: ",
                   "vaepar.errors.OptionError: "):
        if message.startswith(prefix):
            return VaeparError(message[len(prefix):])
    where = f"worker rank {failure.local_rank}" + (f" on node {spec.node_rank}" if spec.nnodes > 1 else "")
    if not message:
        killed = f" (killed by signal {-failure.exitcode})" if failure.exitcode < 0 else ""
        return VaeparError(f"{where} failed: exit code {failure.exitcode}{killed}")
    last = message.splitlines()[-1]
    if any(sign in message for sign in PEER_LOST):
        return VaeparError(f"{where} lost its connection to the other workers (another worker or node "
                           f"failed or was stopped): {last}")
    traceback = str((info.get("extraInfo") or {}).get("py_callstack") or "")
    return InternalError(f"{where} failed: {last}", traceback)


def _quiet_launcher_logs() -> None:
    for name in ("torch.distributed.elastic", "torch.distributed.launcher", "torch.multiprocessing"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
