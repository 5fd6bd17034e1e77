"""Launching: two nodes meeting at a local rendezvous, and a worker that dies mid-job."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from conftest import save_latents

VAEPAR = [sys.executable, "-m", "vaepar"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_on_localhost_equal_one_process(kl_models: dict[str, Path], tmp_path: Path) -> None:
    z = torch.randn(2, 4, 19, 23, generator=torch.Generator().manual_seed(11))
    src = save_latents(tmp_path / "z.safetensors", z)
    common = ["decode", str(src), "--model", str(kl_models["kl4"]), "--strategy", "tiled", "--tile-size", "32",
              "--threads", "1", "--raw", "--device", "cpu", "--quiet"]
    subprocess.run([*VAEPAR, *common, "--out", str(tmp_path / "one.safetensors")], check=True, timeout=300)
    endpoint = f"127.0.0.1:{free_port()}"
    nodes = [
        subprocess.Popen([*VAEPAR, *common, "--out", str(tmp_path / "two.safetensors"), "--nnodes", "2",
                          "--node-rank", str(rank), "--nproc", "1", "--rdzv-endpoint", endpoint],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for rank in (0, 1)
    ]
    logs = [node.communicate(timeout=300)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], logs
    one, two = (load_file(tmp_path / f"{n}.safetensors")["sample"] for n in ("one", "two"))
    assert torch.equal(one, two)


def worker_pids(parent: int) -> list[int]:
    """Pids of the worker processes the launcher spawned (not its resource tracker)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == parent and b"spawn_main" in cmdline:
            found.append(int(entry.name))
    return sorted(found)


def test_a_killed_worker_ends_the_job_promptly_without_output(kl_models: dict[str, Path], tmp_path: Path) -> None:
    z = torch.randn(1, 4, 320, 320, generator=torch.Generator().manual_seed(12))
    src = save_latents(tmp_path / "big.safetensors", z)
    out = tmp_path / "out.png"
    proc = subprocess.Popen([*VAEPAR, "decode", str(src), "--model", str(kl_models["kl4"]), "--out", str(out),
                             "--strategy", "tiled", "--tile-size", "32", "--nproc", "2", "--device", "cpu",
                             "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while len(pids := worker_pids(proc.pid)) < 2:
        assert time.monotonic() < deadline and proc.poll() is None, "workers never started"
        time.sleep(0.2)
    time.sleep(3.0)  # let them load the model and start decoding
    assert proc.poll() is None, "the job ended before a worker could be killed"
    os.kill(pids[-1], signal.SIGKILL)
    killed_at = time.monotonic()
    log = proc.communicate(timeout=120)[0]
    assert proc.returncode != 0
    assert time.monotonic() - killed_at < 60, "the group must end promptly"
    assert "worker rank" in log and "failed" in log and "Traceback" not in log, log
    assert list(tmp_path.glob("out*")) == [] and list(tmp_path.glob(".out*")) == []
