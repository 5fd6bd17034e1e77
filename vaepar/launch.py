"""Starting workers: in-process for one, torch's elastic launcher (c10d rendezvous) for more."""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from vaepar.errors import VaeparError


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
            raise ValueError(f"--nproc must be at least 1, got {self.nproc}")
        if self.nnodes < 1:
            raise ValueError(f"--nnodes must be at least 1, got {self.nnodes}")
        if not 0 <= self.node_rank < self.nnodes:
            raise ValueError(f"--node-rank must be in [0, {self.nnodes}), got {self.node_rank}")
        if self.nnodes > 1 and not self.rdzv_endpoint:
            raise ValueError("several nodes need --rdzv-endpoint HOST:PORT (the same on every node)")

    @property
    def world(self) -> int:
        return self.nproc * self.nnodes


def default_threads(nproc: int) -> int:
    """Intra-op threads per CPU worker so that workers x threads = cores."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // nproc)


def run(spec: LaunchSpec, fn: Callable[..., Any], *args: Any) -> Any:
    """Run ``fn(*args)`` on every worker and return global rank 0's result (None on other nodes).

    A worker that fails ends the whole group; its error comes back as a :class:`VaeparError`.
    """
    if spec.world == 1:
        return fn(*args)
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
        results = elastic_launch(config, fn)(*args)
    except ChildFailedError as exc:
        raise VaeparError(_failure_line(exc)) from None
    except Exception as exc:  # rendezvous errors, timeouts, ...
        raise VaeparError(f"worker group failed: {type(exc).__name__}: {exc}") from None
    return results.get(0)


def _failure_line(exc: Any) -> str:
    rank, failure = exc.get_first_failure()
    message = failure.message
    if isinstance(message, dict):
        message = message.get("message", "")
    message = str(message or "").strip()
    for prefix in ("VaeparError: ", "vaepar.errors.VaeparError: "):
        if message.startswith(prefix):
            return message[len(prefix):]
    if not message:
        message = f"exit code {failure.exitcode}" + (" (killed)" if failure.exitcode < 0 else "")
    return f"worker rank {rank} failed: {message.splitlines()[-1] if message else ''}"


def _quiet_launcher_logs() -> None:
    for name in ("torch.distributed.elastic", "torch.distributed.launcher", "torch.multiprocessing"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
