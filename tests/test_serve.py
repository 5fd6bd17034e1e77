"""`vaepar serve` end to end: real servers on 127.0.0.1 (2 CPU gloo workers, tiny random VAEs),
called with diffusers' unmodified ``remote_decode`` / ``remote_encode`` and plain HTTP, compared
with local ``vaepar decode`` / ``vaepar encode`` runs of the same inputs."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import imageio.v3 as iio
import numpy as np
import pytest
import requests
import torch
from diffusers.utils.remote_utils import remote_decode, remote_encode
from PIL import Image
from safetensors.torch import load_file, save_file

from conftest import make_kl, make_wan, save_latents
from vaepar.outputs import to_uint8

VAEPAR = [sys.executable, "-m", "vaepar"]
TOKEN = "s3cret-token"
TOL = 1e-4  # shard vs shard on the same workers is exact; scaled round trips differ by rounding


@dataclass
class Server:
    """A running `vaepar serve` subprocess."""

    proc: subprocess.Popen[bytes]
    url: str
    log: Path
    model: Path

    def endpoint(self, path: str, token: str | None = TOKEN) -> str:
        return f"{self.url}{path}" + (f"?token={token}" if token else "")

    def health(self) -> dict[str, Any]:
        return requests.get(f"{self.url}/health", timeout=10).json()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60, *, signalled: bool = False) -> int:
        """Signal the server (unless the test already did: a second SIGTERM forces it) and wait for it."""
        if self.proc.poll() is None and not signalled:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=timeout)


def start_server(model: Path, log: Path, *args: str, env: dict[str, str] | None = None) -> Server:
    """Start a server on a free port and wait until it serves."""
    handle = log.open("wb")
    proc = subprocess.Popen([*VAEPAR, "serve", "--model", str(model), "--nproc", "2", "--threads", "1",
                             "--device", "cpu", "--port", "0", *args],
                            stdout=handle, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        for line in log.read_text(errors="replace").splitlines():
            if line.startswith("serving ") and " at http://" in line:
                return Server(proc=proc, url=line.split(" at ")[1].split()[0], log=log, model=model)
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"server did not start:\n{log.read_text(errors='replace')}")


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("serve-models")
    return {"kl4": make_kl(root / "kl4", 4, True, None), "flux": make_kl(root / "flux", 16, False, 0.1159),
            "wan": make_wan(root / "wan", "wan21")}


@pytest.fixture(scope="module")
def kl_server(models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = start_server(models["kl4"], tmp_path_factory.mktemp("kl") / "serve.log", "--strategy", "shard",
                          "--token", TOKEN, "--max-pixels", str(256 * 256))
    yield server
    assert server.stop() == 0, server.log.read_text()


@pytest.fixture(scope="module")
def flux_server(models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = start_server(models["flux"], tmp_path_factory.mktemp("flux") / "serve.log", "--max-queue", "2")
    yield server
    assert server.stop() == 0, server.log.read_text()


@pytest.fixture(scope="module")
def wan_server(models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = start_server(models["wan"], tmp_path_factory.mktemp("wan") / "serve.log", "--fps", "8")
    yield server
    assert server.stop(signal.SIGINT) == 0, server.log.read_text()  # Ctrl+C, as SIGTERM


def local(command: str, source: Path, out: Path, model: Path, *args: str) -> Path:
    """The same job through the local CLI: 2 workers, 1 thread each, as the servers run."""
    subprocess.run([*VAEPAR, command, str(source), "--out", str(out), "--model", str(model), "--nproc", "2",
                    "--threads", "1", "--device", "cpu", "--quiet", *args], check=True, timeout=300)
    return out


def local_decode(tmp: Path, model: Path, z: torch.Tensor, *args: str, name: str = "z") -> torch.Tensor:
    src = save_latents(tmp / f"{name}.safetensors", z)
    return load_file(local("decode", src, tmp / f"{name}-out.safetensors", model, "--raw", *args))["sample"]


def latents(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def close(a: torch.Tensor, b: torch.Tensor, tol: float = TOL) -> float:
    err = float((a.float() - b.float()).abs().max() / max(1.0, float(b.abs().max())))
    assert err <= tol, err
    return err


def quiet_client(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the client's own do_scaling deprecation
        return fn(*args, **kwargs)


# --- every output type, against a local decode ---------------------------------------------------


def test_decode_output_types_match_local_decode(kl_server: Server, tmp_path: Path) -> None:
    z = latents(1, 4, 12, 10)
    ref = local_decode(tmp_path, kl_server.model, z, "--strategy", "shard")
    url = kl_server.endpoint("/decode")
    pt = quiet_client(remote_decode, url, z, do_scaling=False, output_type="pt", return_type="pt")
    assert pt.dtype == torch.float32 and pt.shape == ref.shape == (1, 3, 48, 40)
    assert torch.equal(pt, ref)  # same strategy, workers and threads as the local run
    uint8 = quiet_client(remote_decode, url, z, do_scaling=False, output_type="pt", return_type="pt",
                         partial_postprocess=True)
    assert uint8.dtype == torch.uint8 and np.array_equal(uint8.numpy(), to_uint8(ref))
    png = quiet_client(remote_decode, url, z, do_scaling=False, output_type="pil", image_format="png")
    assert png.format == "png" and png.size == (40, 48)
    assert np.abs(np.asarray(png).astype(int) - to_uint8(ref)[0].astype(int)).max() <= 1
    jpeg = quiet_client(remote_decode, url, z, do_scaling=False, output_type="pil", image_format="jpg")
    assert jpeg.format == "jpeg" and jpeg.size == (40, 48)
    buffer = io.BytesIO()
    Image.fromarray(to_uint8(ref)[0]).save(buffer, format="JPEG", quality=95)
    assert np.array_equal(np.asarray(jpeg), np.asarray(Image.open(buffer).convert("RGB")))  # lossy, same encoder


def test_decode_float16_request_replies_float16(kl_server: Server, tmp_path: Path) -> None:
    z = latents(2, 4, 8, 8, seed=3)
    ref = local_decode(tmp_path, kl_server.model, z.half(), "--strategy", "shard")
    pt = quiet_client(remote_decode, kl_server.endpoint("/decode"), z.half(), do_scaling=False,
                      output_type="pt", return_type="pt")
    assert pt.dtype == torch.float16 and pt.shape == (2, 3, 32, 32)
    assert torch.equal(pt, ref.half())


def test_scaling_parameter_cases(kl_server: Server, tmp_path: Path) -> None:
    """The client's scaling choices (z / scaling + shift; the model's own with do_scaling alone;
    nothing) all reach the same latents as the local decode of the unscaled tensor."""
    z = latents(1, 4, 8, 8, seed=5)
    ref = local_decode(tmp_path, kl_server.model, z, "--strategy", "shard")
    model_scaling = 0.5  # tests/conftest.make_kl
    url = kl_server.endpoint("/decode")
    cases = {
        "none": (z, dict(do_scaling=False)),
        "model": (z * model_scaling, dict(do_scaling=True)),
        "scaling": (z * 0.3, dict(scaling_factor=0.3)),
        "scaling+shift": ((z - 0.25) * 0.3, dict(scaling_factor=0.3, shift_factor=0.25)),
    }
    for name, (sent, kwargs) in cases.items():
        out = quiet_client(remote_decode, url, sent, output_type="pt", return_type="pt", **kwargs)
        close(out, ref)
    # a local decode with the same factors applies them as the server does, bit for bit
    scaled = (z - 0.25) * 0.3
    src = save_latents(tmp_path / "scaled.safetensors", scaled)
    local_scaled = load_file(local("decode", src, tmp_path / "scaled-out.safetensors", kl_server.model,
                                   "--strategy", "shard", "--scaling-factor", "0.3", "--shift-factor", "0.25"))["sample"]
    out = quiet_client(remote_decode, url, scaled, output_type="pt", return_type="pt", scaling_factor=0.3,
                       shift_factor=0.25)
    assert torch.equal(out, local_scaled)


def test_packed_flux_latents(flux_server: Server, tmp_path: Path) -> None:
    """Packed (B, N, 4C) latents with height/width, as Flux pipelines hand them over."""
    z = latents(1, 16, 8, 12, seed=7)
    packed = z.view(1, 16, 4, 2, 6, 2).permute(0, 2, 4, 1, 3, 5).reshape(1, 24, 64)
    ref = local_decode(tmp_path, flux_server.model, z)
    out = quiet_client(remote_decode, flux_server.url + "/decode", packed, do_scaling=False, output_type="pt",
                       return_type="pt", height=32, width=48)
    assert torch.equal(out, ref)
    with pytest.raises(RuntimeError, match="do not fit"):
        quiet_client(remote_decode, flux_server.url + "/decode", packed, do_scaling=False, output_type="pt",
                     return_type="pt", height=32, width=32)


def test_wan_decode_to_mp4_and_tensor(wan_server: Server, tmp_path: Path) -> None:
    z = latents(1, 4, 3, 8, 8, seed=9)
    ref = local_decode(tmp_path, wan_server.model, z)
    url = wan_server.url + "/decode"
    pt = quiet_client(remote_decode, url, z, do_scaling=False, output_type="pt", return_type="pt")
    assert pt.shape == ref.shape == (1, 3, 9, 64, 64) and torch.equal(pt, ref)
    frames = quiet_client(remote_decode, url, z, do_scaling=False, output_type="pt", return_type="pt",
                          partial_postprocess=True)
    assert frames.shape == (9, 64, 64, 3) and np.array_equal(frames.numpy(), to_uint8(ref)[0])
    mp4 = quiet_client(remote_decode, url, z, do_scaling=False, output_type="mp4", return_type="mp4")
    assert isinstance(mp4, bytes)
    src = save_latents(tmp_path / "v.safetensors", z)
    local_mp4 = local("decode", src, tmp_path / "v.mp4", wan_server.model, "--raw", "--fps", "8")
    ours, theirs = iio.imread(mp4, extension=".mp4"), iio.imread(local_mp4)
    assert ours.shape == theirs.shape == (9, 64, 64, 3)
    assert np.abs(ours.astype(int) - theirs.astype(int)).max() <= 2  # same pixels, same x264 settings


def test_wan_scaling_uses_latents_mean_and_std(wan_server: Server, tmp_path: Path) -> None:
    """do_scaling with a video model: the model's per-channel latents_mean/latents_std."""
    from diffusers import AutoencoderKLWan

    cfg = AutoencoderKLWan.load_config(wan_server.model)
    mean = torch.tensor(cfg["latents_mean"]).view(1, -1, 1, 1, 1)
    std = torch.tensor(cfg["latents_std"]).view(1, -1, 1, 1, 1)
    z = latents(1, 4, 2, 8, 8, seed=13)
    ref = local_decode(tmp_path, wan_server.model, z)
    out = quiet_client(remote_decode, wan_server.url + "/decode", (z - mean) / std, do_scaling=True,
                       output_type="pt", return_type="pt")
    close(out, ref)


# --- encode --------------------------------------------------------------------------------------


def test_encode_pil_and_tensor_match_local_encode(kl_server: Server, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (32, 48, 3), dtype=np.uint8))
    image.save(tmp_path / "img.png")
    ref = load_file(local("encode", tmp_path / "img.png", tmp_path / "img.safetensors", kl_server.model,
                          "--raw", "--strategy", "shard"))["latents"]
    url = kl_server.endpoint("/encode")
    z = remote_encode(url, image)
    assert z.shape == ref.shape == (1, 4, 8, 12) and torch.equal(z, ref)
    scaled = remote_encode(url, image, scaling_factor=0.5, shift_factor=0.1)
    close(scaled, (ref - 0.1) * 0.5)

    pixels = torch.rand(2, 3, 16, 24, generator=torch.Generator().manual_seed(2)) * 2 - 1
    save_file({"sample": pixels}, str(tmp_path / "px.safetensors"))
    ref_t = load_file(local("encode", tmp_path / "px.safetensors", tmp_path / "px-z.safetensors", kl_server.model,
                            "--raw", "--strategy", "shard"))["latents"]
    z_t = remote_encode(url, pixels)
    assert z_t.shape == (2, 4, 4, 6) and torch.equal(z_t, ref_t)


def test_encode_refuses_sizes_off_the_model_scale(kl_server: Server) -> None:
    image = Image.new("RGB", (30, 32))
    with pytest.raises(RuntimeError, match="not a multiple of 4"):
        remote_encode(kl_server.endpoint("/encode"), image)


# --- concurrency and the queue -------------------------------------------------------------------


def test_concurrent_clients_each_get_their_own_answer(kl_server: Server) -> None:
    """8 threads x 8 requests over 4 different inputs and 2 reply types: each reply is the one
    computed for its own request (references taken one at a time first)."""
    url = kl_server.endpoint("/decode")
    inputs = [latents(1, 4, 6, 6, seed=100 + i) for i in range(4)]
    refs = [quiet_client(remote_decode, url, z, do_scaling=False, output_type="pt", return_type="pt")
            for z in inputs]
    assert all(not torch.equal(refs[0], r) for r in refs[1:])
    failures: list[str] = []

    def client(t: int) -> None:
        for i in range(8):
            k, uint8 = (t + i) % 4, (t * 8 + i) % 2 == 1
            try:
                out = quiet_client(remote_decode, url, inputs[k], do_scaling=False, output_type="pt",
                                   return_type="pt", partial_postprocess=uint8)
                want = torch.from_numpy(to_uint8(refs[k])) if uint8 else refs[k]
                if not torch.equal(out, want):
                    failures.append(f"thread {t} request {i}: wrong answer")
            except Exception as exc:  # noqa: BLE001 - collected and reported below
                failures.append(f"thread {t} request {i}: {exc}")

    threads = [threading.Thread(target=client, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=300)
    assert not failures, failures
    assert kl_server.health()["status"] == "ok"


def test_full_queue_answers_503_never_hangs(flux_server: Server) -> None:
    """--max-queue 2: of 8 simultaneous requests at most 3 are admitted (1 running, 2 waiting);
    the others get 503 JSON with Retry-After at once; the admitted ones are all correct."""
    z = latents(1, 16, 32, 32, seed=21)
    ref = quiet_client(remote_decode, flux_server.url + "/decode", z, do_scaling=False, output_type="pt",
                       return_type="pt")
    body = z.numpy().tobytes()
    params = [("shape", s) for s in z.shape] + [("dtype", "float32"), ("output_type", "pt")]
    barrier, results = threading.Barrier(8), []

    def client() -> None:
        barrier.wait()
        results.append(requests.post(flux_server.url + "/decode", params=params, data=body,
                                     headers={"Content-Type": "tensor/binary", "Accept": "tensor/binary"},
                                     timeout=120))

    threads = [threading.Thread(target=client) for _ in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=180)
    codes = sorted(r.status_code for r in results)
    assert len(codes) == 8 and set(codes) <= {200, 503}, codes
    assert 1 <= codes.count(200) <= 3 and codes.count(503) >= 5, codes
    for r in results:
        if r.status_code == 503:
            assert "queue is full" in r.json()["error"] and r.headers["Retry-After"].isdigit()
        else:
            shape = json.loads(r.headers["shape"])
            got = torch.frombuffer(bytearray(r.content), dtype=torch.float32).reshape(shape)
            assert torch.equal(got, ref)


# --- bad requests --------------------------------------------------------------------------------


def post(url: str, shape: tuple[int, ...] | None, body: bytes, *, dtype: str = "float32",
         headers: dict[str, str] | None = None, **params: Any) -> requests.Response:
    query: list[tuple[str, Any]] = [("shape", s) for s in shape or ()] + [("dtype", dtype), *params.items()]
    return requests.post(url, params=query, data=body, timeout=60,
                         headers={"Content-Type": "tensor/binary", "Accept": "tensor/binary", **(headers or {})})


def test_bad_requests_get_json_errors_and_the_server_keeps_serving(kl_server: Server, wan_server: Server) -> None:
    z = latents(1, 4, 8, 8)
    good = z.numpy().tobytes()
    url = kl_server.endpoint("/decode")
    nan = z.clone()
    nan[0, 0, 0, 0] = float("nan")
    cases = {
        "truncated body": (post(url, (1, 4, 8, 8), good[:-10], output_type="pt"), 400, "bytes"),
        "longer body": (post(url, (1, 4, 8, 8), good + b"\0" * 8, output_type="pt"), 400, "bytes"),
        "wrong dtype": (post(url, (1, 4, 8, 8), good, dtype="int8", output_type="pt"), 400, "dtype"),
        "shape vs bytes": (post(url, (1, 4, 8, 16), good, output_type="pt"), 400, "bytes"),
        "channels": (post(url, (1, 2, 16, 8), good, output_type="pt"), 400, "channels"),
        "NaN": (post(url, (1, 4, 8, 8), nan.numpy().tobytes(), output_type="pt"), 400, "NaN"),
        "oversized": (post(url, (1, 4, 100000, 100000), good, output_type="pt"), 413, "limit"),
        "image to video": (post(wan_server.url + "/decode", (1, 4, 8, 8), good, output_type="pt"), 400, "video"),
        "no token": (post(kl_server.endpoint("/decode", None), (1, 4, 8, 8), good, output_type="pt"), 401, "token"),
        "wrong token": (post(kl_server.endpoint("/decode", "nope"), (1, 4, 8, 8), good, output_type="pt"), 401,
                        "token"),
        "unknown path": (requests.post(kl_server.url + "/nothing", timeout=10), 404, "Not Found"),
        "wrong method": (requests.get(kl_server.url + "/decode", timeout=10), 405, "Method Not Allowed"),
    }
    for name, (response, status, words) in cases.items():
        assert response.status_code == status, (name, response.status_code, response.text)
        assert response.headers["content-type"] == "application/json", name
        assert words in response.json()["error"], (name, response.json())
    bearer = post(kl_server.url + "/decode", (1, 4, 8, 8), good, output_type="pt",
                  headers={"Authorization": f"Bearer {TOKEN}"})
    assert bearer.status_code == 200 and json.loads(bearer.headers["shape"]) == [1, 3, 32, 32]
    log = kl_server.log.read_text()
    assert '"POST /decode" shape=1x4x100000x100000 413' in log and TOKEN not in log


def test_health_and_metrics(kl_server: Server) -> None:
    quiet_client(remote_decode, kl_server.endpoint("/decode"), latents(1, 4, 4, 4), do_scaling=False,
                 output_type="pt", return_type="pt")
    health = kl_server.health()
    assert health["status"] == "ok" and health["workers"] == 2 and len(health["pids"]) == 2
    assert requests.get(kl_server.url + "/metrics", timeout=10).status_code == 401
    text = requests.get(kl_server.endpoint("/metrics"), timeout=10).text
    for name in ("vaepar_queue_length", "vaepar_in_flight", "vaepar_served_total", "vaepar_failed_total",
                 "vaepar_request_seconds_bucket", 'vaepar_rank_peak_memory_bytes{rank="1"}'):
        assert name in text, name


# --- lifetime: idle, killed workers, shutdown ----------------------------------------------------


def test_idle_server_outlives_the_collective_timeout_and_recovers_from_killed_workers(
        models: dict[str, Path], tmp_path: Path) -> None:
    """Collectives time out after 4 s here; the server idles 10 s and still answers. Then a worker
    killed mid-request fails that request with 503 within seconds, the group restarts, and requests
    succeed again within 60 s; SIGTERM exits 0 with no worker left."""
    server = start_server(models["kl4"], tmp_path / "serve.log", env={"VAEPAR_COLLECTIVE_TIMEOUT_S": "4"})
    sigterm = False
    try:
        url, z = server.url + "/decode", latents(1, 4, 8, 8)
        ref = quiet_client(remote_decode, url, z, do_scaling=False, output_type="pt", return_type="pt")
        time.sleep(10)
        again = quiet_client(remote_decode, url, z, do_scaling=False, output_type="pt", return_type="pt")
        assert torch.equal(again, ref) and server.health()["restarts"] == 0

        first = server.health()["pids"]
        big = latents(1, 4, 128, 128, seed=1)
        answer: list[requests.Response] = []
        slow = threading.Thread(target=lambda: answer.append(post(url, tuple(big.shape), big.numpy().tobytes(),
                                                                  output_type="pt")))
        slow.start()
        while not server.health()["in_flight"]:
            assert slow.is_alive()
            time.sleep(0.05)
        os.kill(first[1], signal.SIGKILL)
        killed = time.monotonic()
        slow.join(timeout=30)
        assert answer and answer[0].status_code == 503 and "restarting" in answer[0].json()["error"]
        assert time.monotonic() - killed < 15
        while True:
            assert time.monotonic() - killed < 60, server.log.read_text()
            try:
                out = quiet_client(remote_decode, url, z, do_scaling=False, output_type="pt", return_type="pt")
                break
            except RuntimeError as exc:
                assert "restarting" in str(exc)
                time.sleep(0.5)
        assert torch.equal(out, ref)
        health = server.health()
        assert health["restarts"] == 1 and not set(health["pids"]) & set(first)

        answer.clear()  # SIGTERM while a request runs: it finishes, then the server exits 0
        slow = threading.Thread(target=lambda: answer.append(post(url, tuple(big.shape), big.numpy().tobytes(),
                                                                  output_type="pt")))
        slow.start()
        while not server.health()["in_flight"]:
            time.sleep(0.05)
        server.proc.send_signal(signal.SIGTERM)
        sigterm = True
        slow.join(timeout=60)
        assert answer and answer[0].status_code == 200 and json.loads(answer[0].headers["shape"]) == [1, 3, 512, 512]
    finally:
        code = server.stop(signalled=sigterm)
    assert code == 0, server.log.read_text()
    time.sleep(0.5)
    for pid in [*first, *health["pids"]]:
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]
    assert server.log.read_text().rstrip().endswith("stopped")


def test_one_worker_on_all_addresses_warns_and_reads_the_token_from_the_environment(
        models: dict[str, Path], tmp_path: Path) -> None:
    server = start_server(models["kl4"], tmp_path / "serve.log", "--nproc", "1", "--host", "0.0.0.0",
                          env={"VAEPAR_TOKEN": TOKEN})
    try:
        assert "warning: listening on 0.0.0.0, reachable from other machines" in server.log.read_text()
        url = server.url.replace("0.0.0.0", "127.0.0.1")
        z = latents(1, 4, 8, 8)
        assert post(url + "/decode", (1, 4, 8, 8), z.numpy().tobytes(), output_type="pt").status_code == 401
        out = quiet_client(remote_decode, f"{url}/decode?token={TOKEN}", z, do_scaling=False, output_type="pt",
                           return_type="pt")
        assert out.shape == (1, 3, 32, 32)
        assert requests.get(url + "/health", timeout=10).json()["workers"] == 1
    finally:
        assert server.stop() == 0, server.log.read_text()


def test_serve_refuses_bad_options_with_one_line(models: dict[str, Path], tmp_path: Path) -> None:
    busy = socket.create_server(("127.0.0.1", 0))
    cases = [
        (["--port", str(busy.getsockname()[1])], 1, "cannot listen on 127.0.0.1"),
        (["--max-queue", "0"], 2, "--max-queue must be at least 1"),
        (["--port", "70000"], 2, "--port must be in"),
        (["--token", "a", "--token-file", str(tmp_path / "t")], 2, "give the token once"),
        (["--token-file", str(tmp_path / "missing")], 1, "cannot read the token file"),
    ]
    for args, code, words in cases:
        r = subprocess.run([*VAEPAR, "serve", "--model", str(models["kl4"]), "--device", "cpu", *args],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == code and words in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    busy.close()
