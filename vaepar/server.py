"""``vaepar serve``: diffusers' Remote VAE protocol over HTTP, in front of a warm worker group.

The app (Starlette, run by uvicorn in the server process) refuses everything it can before the
workers see it: token (401), declared shape and limits (400/413, from the query, before the body is
read), body length and values, the model's channels and sizes (:mod:`vaepar.protocol`). A valid
request becomes a :class:`~vaepar.service.Job` for the :class:`~vaepar.pool.Pool`; a full queue or a
restarting group answers 503 with ``Retry-After``. Every refusal is a JSON ``{"error": ...}``.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import itertools
import logging
import math
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

import torch
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from vaepar import protocol
from vaepar.errors import OptionError, VaeparError
from vaepar.pool import Pool, Unavailable
from vaepar.service import Blob, Job
from vaepar.vae import ModelSpec

log = logging.getLogger("vaepar.serve")
LOOPBACK = ("localhost",)
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, math.inf)
Handler = Callable[[Request], Awaitable[Response]]


@dataclass(frozen=True, kw_only=True, slots=True)
class ServeConfig:
    """The HTTP side of a server."""

    host: str = "127.0.0.1"
    port: int = 8000
    max_queue: int = 16
    max_pixels: int = protocol.DEFAULT_MAX_PIXELS
    token: str | None = None
    job_timeout: float = 600.0
    retry_after: int = 5

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise OptionError(f"--port must be in [0, 65535], got {self.port}")
        if self.max_queue < 1:
            raise OptionError(f"--max-queue must be at least 1, got {self.max_queue}")
        if self.max_pixels < 1:
            raise OptionError(f"--max-pixels must be at least 1, got {self.max_pixels}")
        if self.job_timeout <= 0:
            raise OptionError(f"--timeout must be positive, got {self.job_timeout}")
        if self.token is not None and not self.token.strip():
            raise OptionError("the token is empty")

    @property
    def loopback(self) -> bool:
        """Whether the server listens on this machine only."""
        if self.host in LOOPBACK:
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False


class Metrics:
    """Counters for ``GET /metrics``, in Prometheus' text format (prometheus_client)."""

    def __init__(self, pool: Pool) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = registry = CollectorRegistry()
        Gauge("vaepar_queue_length", "Requests waiting for the workers", registry=registry).set_function(
            lambda: pool.waiting)
        Gauge("vaepar_in_flight", "Requests the workers are running", registry=registry).set_function(
            lambda: int(pool.in_flight is not None))
        Gauge("vaepar_up", "1 when the worker group is serving", registry=registry).set_function(
            lambda: int(pool.state in ("ok", "degraded")))
        Gauge("vaepar_worker_restarts", "Times the worker group was restarted", registry=registry).set_function(
            lambda: pool.restarts)
        self.served = Counter("vaepar_served", "Requests answered with a result", ["endpoint"], registry=registry)
        self.failed = Counter("vaepar_failed", "Requests answered with an error", ["endpoint", "code"],
                              registry=registry)
        self.latency = Histogram("vaepar_request_seconds", "Time from request to response", ["endpoint"],
                                 buckets=LATENCY_BUCKETS, registry=registry)
        self.peak = Gauge("vaepar_rank_peak_memory_bytes", "Peak memory of each rank in the last job", ["rank"],
                          registry=registry)
        self.pool = pool

    def record(self, endpoint: str, status: int, seconds: float) -> None:
        """One answered request to ``/decode`` or ``/encode``."""
        if status < 400:
            self.served.labels(endpoint).inc()
        else:
            self.failed.labels(endpoint, str(status)).inc()
        self.latency.labels(endpoint).observe(seconds)

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        reply = self.pool.last_reply
        for stats in reply.ranks if reply is not None else ():
            self.peak.labels(str(stats.rank)).set(stats.peak_mem_bytes)
        return generate_latest(self.registry)


def json_error(message: str, status: int, headers: dict[str, str] | None = None) -> Response:
    """The JSON error every refusal answers with."""
    return Response(protocol.error_body(message), status, headers, media_type="application/json")


def _token_ok(request: Request, token: str | None) -> bool:
    if token is None:
        return True
    given = protocol.token_of(request.query_params.multi_items(), request.headers)
    return given is not None and hmac.compare_digest(given.encode(), token.encode())


async def _body(request: Request, limit: int, status: int) -> bytes:
    """The request body, refused with ``status`` as soon as it exceeds ``limit`` bytes."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise protocol.ProtocolError(f"the body has {declared} bytes, more than the {limit} this request allows",
                                     status)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise protocol.ProtocolError(f"the body is larger than the {limit} bytes this request allows", status)
        chunks.append(chunk)
    return b"".join(chunks)


def _answer(response: protocol.Response) -> Response:
    return Response(response.body, response.status, response.headers)


class App:
    """The routes of one server: decode, encode, health and metrics."""

    def __init__(self, pool: Pool, spec: ModelSpec, cfg: ServeConfig, dtype: torch.dtype) -> None:
        self.pool, self.spec, self.cfg, self.dtype = pool, spec, cfg, dtype
        self.limits = protocol.Limits.of(spec, cfg.max_pixels)
        self.metrics = Metrics(pool)
        self.ids = itertools.count(1)

    def starlette(self) -> Starlette:
        """The ASGI application, with the access log around every request."""
        routes = [Route("/decode", self._guard(self.decode), methods=["POST"]),
                  Route("/encode", self._guard(self.encode), methods=["POST"]),
                  Route("/health", self.health, methods=["GET"]),
                  Route("/metrics", self._guard(self.render_metrics), methods=["GET"])]
        app = Starlette(routes=routes, exception_handlers={HTTPException: _http_error})
        return AccessLog(app, self.metrics)  # type: ignore[return-value]

    def _guard(self, handler: Handler) -> Handler:
        """Token first, then every failure as a JSON answer: the server never crashes on a request."""

        async def guarded(request: Request) -> Response:
            if not _token_ok(request, self.cfg.token):
                return json_error("missing or wrong token (send 'Authorization: Bearer TOKEN' or ?token=TOKEN)",
                                  401, {"WWW-Authenticate": "Bearer"})
            try:
                return await handler(request)
            except protocol.ProtocolError as exc:
                return _answer(protocol.error_response(exc))
            except Unavailable as exc:
                return json_error(str(exc), 503, {"Retry-After": str(self.cfg.retry_after)})
            except ClientDisconnect:
                return json_error("the client closed the connection before sending the whole body", 400)
            except Exception as exc:  # noqa: BLE001 - answer, log, keep serving
                log.error("internal error on %s: %s\n%s", request.url.path, exc, traceback.format_exc())
                return json_error(f"internal error: {type(exc).__name__}: {exc}", 500)

        return guarded

    async def decode(self, request: Request) -> Response:
        query, headers = request.query_params.multi_items(), dict(request.headers)
        head = protocol.check_decode(query, headers, self.limits)
        body = await _body(request, head.body_bytes, 400)
        job = await run_in_threadpool(self._decode_job, query, headers, body)
        return await self._run(job)

    async def encode(self, request: Request) -> Response:
        query, headers = request.query_params.multi_items(), dict(request.headers)
        limit = protocol.encode_body_limit(query, self.limits)
        body = await _body(request, limit, 400 if "shape" in request.query_params else 413)
        job = await run_in_threadpool(self._encode_job, query, headers, body)
        return await self._run(job)

    def _decode_job(self, query: Any, headers: dict[str, str], body: bytes) -> Job:
        request = protocol.parse_decode(query, headers, body, self.limits)
        z = protocol.model_latents(request, self.spec, dtype=self.dtype)
        return Job(id=next(self.ids), task="decode", tensor=Blob.of(z), reply=request.reply,
                   dtype=str(request.latents.dtype).removeprefix("torch."), label=f"decode {list(z.shape)}")

    def _encode_job(self, query: Any, headers: dict[str, str], body: bytes) -> Job:
        request = protocol.parse_encode(query, headers, body, self.limits)
        x = protocol.model_pixels(request, self.spec)
        return Job(id=next(self.ids), task="encode", tensor=Blob.of(x), factors=request.factors,
                   dtype=str(request.dtype).removeprefix("torch."), label=f"encode {list(x.shape)}")

    async def _run(self, job: Job) -> Response:
        reply = await asyncio.wrap_future(self.pool.submit(job))
        return _answer(reply.response)

    async def health(self, request: Request) -> Response:
        state = self.pool.state
        body = {"status": state, "model": self.spec.name, "class": self.spec.class_name,
                "latent_channels": self.spec.latent_channels, "scale": self.spec.scale, "video": self.spec.is_video,
                "workers": self.pool.spec.world, "device": self.pool.cfg.device, "queue": self.pool.waiting,
                "max_queue": self.pool.max_queue, "in_flight": int(self.pool.in_flight is not None),
                "restarts": self.pool.restarts, "pids": self.pool.pids,
                "uptime_s": round(time.monotonic() - self.pool.started_at, 1)}
        return JSONResponse(body, 200 if state in ("ok", "degraded") else 503)

    async def render_metrics(self, request: Request) -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(self.metrics.render(), 200, media_type=CONTENT_TYPE_LATEST)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return json_error(str(exc.detail), exc.status_code, dict(exc.headers or {}))


class AccessLog:
    """ASGI middleware: one log line per request (client, method, path, shape, status, seconds)."""

    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.monotonic(), [500]

        async def sending(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            self._log(scope, status[0], time.monotonic() - start)

    def _log(self, scope: dict[str, Any], status: int, seconds: float) -> None:
        path = scope.get("path", "")
        query = parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
        shape = "x".join(v for k, v in query if k == "shape") or "-"
        client = (scope.get("client") or ("-",))[0]
        log.info('%s "%s %s" shape=%s %d %.3fs', client, scope.get("method", ""), path, shape, status, seconds)
        if path in ("/decode", "/encode"):
            self.metrics.record(path.lstrip("/"), status, seconds)


def listen(cfg: ServeConfig) -> socket.socket:
    """The server's listening socket (port 0: any free port); one clear error when it cannot bind."""
    family = socket.AF_INET6 if ":" in cfg.host else socket.AF_INET
    try:
        return socket.create_server((cfg.host, cfg.port), family=family)
    except (OSError, OverflowError) as exc:
        raise VaeparError(f"cannot listen on {cfg.host}:{cfg.port}: {exc.strerror or exc}") from None


def url(sock: socket.socket, host: str) -> str:
    """The base URL of a listening socket."""
    port = sock.getsockname()[1]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def serve(app: App, sock: socket.socket, cfg: ServeConfig) -> None:
    """Serve until SIGTERM/SIGINT: stop accepting, refuse what waits, finish what runs, return."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:  # graceful, and no re-raised signal
            if self.should_exit and sig == signal.SIGINT:
                self.force_exit = True
            self.should_exit = True
            # not in the handler itself: the main thread may hold the queue's lock right now
            threading.Thread(target=app.pool.drain, name="vaepar-drain").start()

    config = uvicorn.Config(app.starlette(), log_level="error", access_log=False, lifespan="off",
                            timeout_graceful_shutdown=int(cfg.job_timeout) + 5)
    Server(config).run(sockets=[sock])


def configure_logging() -> None:
    """Access-log lines on stderr, one per request."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
