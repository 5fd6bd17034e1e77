"""The worker group: process-group set-up and the few collectives vaepar uses.

One worker runs without torch.distributed at all; N workers join the group that torch's elastic
launcher set up (gloo on CPU, nccl on CUDA). Every call here is collective or matched point to
point: all ranks make it, in the same order.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from vaepar.errors import VaeparError


BACKENDS = ("nccl", "gloo")


def backend_problem(device_type: str, backend: str | None) -> str | None:
    """Why ``backend`` cannot carry workers on ``device_type`` (None: it can, or none was asked for)."""
    if backend is None:
        return None
    if backend not in BACKENDS:
        return f"--backend must be one of {', '.join(BACKENDS)}, got '{backend}'"
    if backend == "nccl" and device_type != "cuda":
        return "--backend nccl needs --device cuda (gloo runs CPU workers)"
    return None


def backend_for(device_type: str, backend: str | None = None) -> str:
    """The collective backend for a device type: cuda -> nccl, cpu -> gloo; or ``backend`` when
    given (gloo on cuda: ranks may share a GPU, every transfer staged through host memory)."""
    problem = backend_problem(device_type, backend)
    if problem is not None:
        raise ValueError(problem)
    return backend or ("nccl" if device_type == "cuda" else "gloo")


def collective_timeout() -> timedelta:
    """How long a collective may wait for its peers: 30 minutes, or ``VAEPAR_COLLECTIVE_TIMEOUT_S``
    (tests shorten it to show that an idle server's workers never hit it)."""
    return timedelta(seconds=float(os.environ.get("VAEPAR_COLLECTIVE_TIMEOUT_S", 1800)))


@dataclass(kw_only=True, slots=True)
class Comm:
    """This worker's place in the group, and a key-value store shared by all workers.

    ``rank`` and ``world`` are within ``group`` (None: the default group); peers are named by
    their rank in the group and translated for torch.distributed.
    """

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    node_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    store: Any = None
    group: Any = None
    staged: bool = False  # device tensors cross through host memory (gloo on CUDA)

    @staticmethod
    def of_group(group: Any, device: torch.device) -> Comm:
        """The ranks of a process group the caller set up (None: the default group, if any)."""
        if not (dist.is_available() and dist.is_initialized()):
            return Comm(device=device)
        staged = device.type == "cuda" and dist.get_backend(group) == "gloo"
        return Comm(rank=dist.get_rank(group), world=dist.get_world_size(group), device=device, group=group,
                    staged=staged)

    def peer(self, rank: int) -> int:
        """The global rank of ``rank`` in this group."""
        return rank if self.group is None else dist.get_global_rank(self.group, rank)

    @staticmethod
    def join(device_type: str, backend: str | None = None) -> Comm:
        """Join the group described by the launcher's environment (or run alone without one).

        ``RANK`` is the rank :func:`vaepar.launch.meet` assigned in ``--node-rank`` order. On CUDA,
        local ranks take the node's GPUs in turn: several share one only with ``backend`` gloo.
        """
        world = int(os.environ.get("WORLD_SIZE", "1"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        node_rank = int(os.environ.get("VAEPAR_NODE_RANK", "0"))
        backend = backend_for(device_type, backend)
        device = torch.device("cpu")
        if device_type == "cuda":
            device = torch.device("cuda", local_rank % max(1, torch.cuda.device_count()))
            torch.cuda.set_device(device)
        if world == 1:
            return Comm(device=device)
        rank = int(os.environ["RANK"])
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                              is_master=False, timeout=timedelta(minutes=10))
        dist.init_process_group(backend, store=dist.PrefixStore("pg", store), rank=rank, world_size=world,
                                timeout=collective_timeout(), device_id=device if backend == "nccl" else None)
        return Comm(rank=rank, world=world, local_rank=local_rank, node_rank=node_rank, device=device,
                    store=dist.PrefixStore("vaepar", store), staged=backend == "gloo" and device.type == "cuda")

    def close(self) -> None:
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()

    def exchange(self, sends: list[tuple[int, torch.Tensor]], recvs: list[tuple[int, torch.Tensor]]) -> None:
        """Point-to-point transfers posted together; both sides must list matching pairs in order."""
        self.post(sends, recvs)()

    def post(self, sends: list[tuple[int, torch.Tensor]],
             recvs: list[tuple[int, torch.Tensor]]) -> Callable[[], None]:
        """:meth:`exchange` started without waiting: returns the wait. Until it is called, the
        transfers run beside whatever the caller computes (on CUDA, NCCL's own stream; the wait
        makes the current stream wait for it) and the receive buffers must not be read."""
        outgoing = [self._out(t) for _, t in sends]  # held until the wait: the sends read them
        incoming = [self._in(t) for _, t in recvs]
        ops = [dist.P2POp(dist.isend, t, self.peer(p), self.group) for (p, _), t in zip(sends, outgoing)]
        ops += [dist.P2POp(dist.irecv, t, self.peer(p), self.group) for (p, _), t in zip(recvs, incoming)]
        works = dist.batch_isend_irecv(ops) if ops else []

        def wait() -> None:
            for work in works:
                work.wait()
            for (_, dst), got in zip(recvs, incoming):
                if got is not dst:
                    dst.copy_(got)
            outgoing.clear()

        return wait

    def _out(self, t: torch.Tensor) -> torch.Tensor:
        """What to hand the backend to send ``t``: contiguous, in host memory when staged."""
        return torch.empty(t.shape, dtype=t.dtype).copy_(t) if self.staged else t.contiguous()

    def _in(self, t: torch.Tensor) -> torch.Tensor:
        """Where the backend receives into ``t``: ``t`` itself, or a host buffer when staged."""
        return torch.empty(t.shape, dtype=t.dtype) if self.staged else t

    def all_reduce(self, t: torch.Tensor, group: Any = None) -> torch.Tensor:
        """Sum ``t`` over ``group`` (default: this comm's group), in place."""
        buf = self._out(t)
        dist.all_reduce(buf, group=group if group is not None else self.group)
        if buf is not t:
            t.copy_(buf)
        return t

    def all_gather(self, t: torch.Tensor, count: int, group: Any = None) -> list[torch.Tensor]:
        """Every rank's ``t`` (same shape everywhere) from the ``count`` ranks of ``group``, in rank order."""
        buf = self._out(t)
        parts = [torch.empty_like(buf) for _ in range(count)]
        dist.all_gather(parts, buf, group=group if group is not None else self.group)
        return [p.to(t.device) for p in parts]

    def broadcast(self, tensor: torch.Tensor | None) -> torch.Tensor:
        """Rank 0's tensor on every rank (on this rank's device)."""
        if self.world == 1:
            assert tensor is not None
            return tensor.to(self.device)
        meta = self.broadcast_object((tuple(tensor.shape), tensor.dtype) if tensor is not None else None)
        shape, dtype = meta
        buf = tensor.to(self.device).contiguous() if tensor is not None else torch.empty(shape, dtype=dtype, device=self.device)
        return self.broadcast_from(0, buf)

    def scatter_rows(self, tensor: torch.Tensor | None, spans: list[tuple[int, int]]) -> torch.Tensor:
        """Rank 0's ``tensor`` on every rank, each receiving only its span of rows (dim -2):
        elsewhere the rows are NaN, so that reading one it was not sent cannot pass unnoticed."""
        if self.world == 1:
            assert tensor is not None
            return tensor.to(self.device)
        shape, dtype = self.broadcast_object((tuple(tensor.shape), tensor.dtype) if tensor is not None else None)
        if self.rank == 0:
            assert tensor is not None
            self.exchange([(r, tensor[..., a:b, :]) for r, (a, b) in enumerate(spans) if r and b > a], [])
            return tensor.to(self.device)
        out = torch.full(shape, float("nan"), dtype=dtype, device=self.device)
        a, b = spans[self.rank]
        if b > a:
            rows = torch.empty((*shape[:-2], b - a, shape[-1]), dtype=dtype, device=self.device)
            self.exchange([], [(0, rows)])
            out[..., a:b, :] = rows
        return out

    def broadcast_from(self, src: int, buf: torch.Tensor) -> torch.Tensor:
        """Rank ``src``'s ``buf`` into every rank's ``buf`` (same shape and dtype everywhere)."""
        if self.world > 1:
            wire = self._out(buf)
            dist.broadcast(wire, src=self.peer(src), group=self.group)
            if wire is not buf:
                buf.copy_(wire)
        return buf

    def barrier(self) -> None:
        """Wait for every rank (and, on CUDA, for this rank's queued work)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        if self.world > 1:
            dist.barrier(group=self.group)

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=self.peer(0), group=self.group, device=self._object_device())
        return box[0]

    def agree(self, error: str | None) -> None:
        """Collective: raise :class:`VaeparError` on every rank if any rank had ``error``.

        The rank with the error reports its own message; the others say where it happened, so
        that one rank's bad model or input stops every node with one clear line.
        """
        reports = self.gather_all((self.node_rank, self.rank, error))
        failed = [(node, rank, why) for node, rank, why in reports if why]
        if error:
            raise VaeparError(error)
        if not failed:
            return
        node, rank, why = failed[0]
        where = f"node {node}" if node != self.node_rank else f"worker rank {rank}"
        raise VaeparError(f"{where} failed: {why}")

    def gather_all(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order, on every rank."""
        if self.world == 1:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def _object_device(self) -> torch.device | None:
        return self.device if self.device.type == "cuda" and not self.staged else None

    def add(self, key: str, amount: int) -> int:
        """Atomically add to a counter shared by all ranks; returns the new value."""
        return int(self.store.add(key, amount)) if self.store is not None else amount
