"""A bounded load generator for `vaepar serve` on loopback: throughput and latency percentiles.

Sends ``--count`` decode requests from ``--concurrency`` threads (random latents, raw bytes as
diffusers' ``remote_decode`` sends them) and stops by itself. Either against a running server
(``--url``), or it starts one (``--model``, ``--nproc``, ...), runs the load and stops it.

    python scripts/load_serve.py --model tiny --nproc 2 --count 64 --concurrency 8
    python scripts/load_serve.py --url http://127.0.0.1:8000 --shape 1,16,64,64 --output-type pt
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests
import torch


def start(args: argparse.Namespace, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    """`vaepar serve` on a free loopback port; its URL once it serves."""
    command = [sys.executable, "-m", "vaepar", "serve", "--model", args.model, "--nproc", str(args.nproc),
               "--port", "0", "--max-queue", str(args.max_queue), *args.serve_args]
    proc = subprocess.Popen(command, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        for line in log.read_text(errors="replace").splitlines():
            if line.startswith("serving ") and " at http://" in line:
                return proc, line.split(" at ")[1].split()[0]
        time.sleep(0.2)
    proc.kill()
    sys.exit(f"the server did not start:\n{log.read_text(errors='replace')}")


def default_shape(url: str, headers: dict[str, str]) -> tuple[int, ...]:
    """Latents of a 512x512 image (or 17 frames of 256x256 video) for the server's model."""
    health = requests.get(f"{url}/health", headers=headers, timeout=10).json()
    channels, scale = health["latent_channels"], health["scale"]
    return (1, channels, 5, 256 // scale, 256 // scale) if health["video"] else (1, channels, 512 // scale, 512 // scale)


def one(url: str, body: bytes, params: list[tuple[str, str]], headers: dict[str, str],
        timeout: float) -> tuple[int, float]:
    start = time.perf_counter()
    try:
        r = requests.post(f"{url}/decode", params=params, data=body, headers=headers, timeout=timeout)
        status = r.status_code
    except requests.RequestException:
        status = 0
    return status, time.perf_counter() - start


def load(url: str, args: argparse.Namespace) -> dict[str, object]:
    auth = {"Authorization": f"Bearer {args.token}"} if args.token else {}
    shape = tuple(int(v) for v in args.shape.split(",")) if args.shape else default_shape(url, auth)
    z = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    params = [("shape", str(s)) for s in shape] + [("dtype", "float32"), ("output_type", args.output_type),
                                                     ("partial_postprocess", "True")]
    headers = {**auth, "Content-Type": "tensor/binary", "Accept": "tensor/binary"}
    body = z.numpy().tobytes()
    one(url, body, params, headers, args.timeout)  # warm-up, not counted
    clock = time.perf_counter()
    with ThreadPoolExecutor(args.concurrency) as pool:
        results = list(pool.map(lambda _: one(url, body, params, headers, args.timeout), range(args.count)))
    wall = time.perf_counter() - clock
    ok = sorted(t for s, t in results if s == 200)
    pct = (lambda q: ok[min(len(ok) - 1, int(q * len(ok)))]) if ok else (lambda q: float("nan"))
    return {"url": url, "shape": list(shape), "count": args.count, "concurrency": args.concurrency,
            "statuses": dict(Counter(s for s, _ in results)), "seconds": round(wall, 3),
            "throughput_rps": round(len(ok) / wall, 3),
            "latency_s": {"p50": pct(0.5), "p90": pct(0.9), "p99": pct(0.99), "max": ok[-1] if ok else None,
                          "mean": statistics.fmean(ok) if ok else None}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="A running server (default: start one with --model).")
    parser.add_argument("--model", default="tiny", help="Model for the server this script starts.")
    parser.add_argument("--nproc", type=int, default=2, help="Workers of the server this script starts.")
    parser.add_argument("--max-queue", type=int, default=16, help="--max-queue of the server this script starts.")
    parser.add_argument("--count", type=int, default=64, help="Requests in all (after one warm-up).")
    parser.add_argument("--concurrency", type=int, default=8, help="Client threads.")
    parser.add_argument("--shape", help="Latent shape, e.g. 1,16,64,64 (default: 512x512 pixels).")
    parser.add_argument("--output-type", default="pt", choices=("pt", "pil", "mp4"))
    parser.add_argument("--token", default=os.environ.get("VAEPAR_TOKEN"))
    parser.add_argument("--timeout", type=float, default=600.0, help="Seconds per request.")
    parser.add_argument("--json", type=Path, help="Also write the result here.")
    parser.add_argument("serve_args", nargs="*", help="After --: more options for `vaepar serve`.")
    args = parser.parse_args()
    if args.count < 1 or args.concurrency < 1:
        parser.error("--count and --concurrency must be at least 1")
    proc = None
    with tempfile.TemporaryDirectory() as tmp:
        url = args.url
        if url is None:
            proc, url = start(args, Path(tmp) / "serve.log")
        try:
            result = load(url.rstrip("/"), args)
        finally:
            if proc is not None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=120)
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
