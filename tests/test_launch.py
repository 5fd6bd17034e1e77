"""Launching: two nodes meeting at a local rendezvous (ranks by --node-rank, failures shared), a
worker that dies mid-job, and the vaepar process itself killed."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import save_latents

VAEPAR = [sys.executable, "-m", "vaepar"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_node(common: list[str], rank: int, endpoint: str, out: Path) -> subprocess.Popen[str]:
    return subprocess.Popen([*VAEPAR, *common, "--out", str(out), "--nnodes", "2", "--node-rank", str(rank),
                             "--nproc", "1", "--rdzv-endpoint", endpoint],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_two_nodes_node_one_first_output_only_on_node_zero(kl_models: dict[str, Path], tmp_path: Path) -> None:
    """The rendezvous ranks agents by (host, pid): node 1, started first, sorts first. vaepar's
    rank 0 must still be on --node-rank 0: the output appears at node 0's --out only."""
    z = torch.randn(2, 4, 19, 23, generator=torch.Generator().manual_seed(11))
    src = save_latents(tmp_path / "z.safetensors", z)
    common = ["decode", str(src), "--model", str(kl_models["kl4"]), "--strategy", "tiled", "--tile-size", "32",
              "--threads", "1", "--raw", "--device", "cpu", "--quiet"]
    subprocess.run([*VAEPAR, *common, "--out", str(tmp_path / "one.safetensors")], check=True, timeout=300)
    endpoint = f"127.0.0.1:{free_port()}"
    for node in ("node0", "node1"):
        (tmp_path / node).mkdir()
    node1 = start_node(common, 1, endpoint, tmp_path / "node1" / "two.safetensors")
    time.sleep(2.0)
    node0 = start_node(common, 0, endpoint, tmp_path / "node0" / "two.safetensors")
    assert node1.pid < node0.pid, "pids wrapped around: node 1 would not sort first"
    logs = [node.communicate(timeout=300) for node in (node0, node1)]
    assert [node0.returncode, node1.returncode] == [0, 0], logs
    assert list((tmp_path / "node1").iterdir()) == []
    one, two = (load_file(p)["sample"] for p in (tmp_path / "one.safetensors", tmp_path / "node0" / "two.safetensors"))
    assert torch.equal(one, two)


def test_bad_input_on_node_zero_ends_both_nodes(kl_models: dict[str, Path], tmp_path: Path) -> None:
    """Node 0 fails validation before any worker starts; it still meets node 1 to tell it, so
    both stop within seconds (not the rendezvous time-out), each with one line."""
    good = save_latents(tmp_path / "z.safetensors", torch.randn(1, 4, 8, 8))
    common = ["decode", "--model", str(kl_models["kl4"]), "--device", "cpu", "--quiet"]
    endpoint = f"127.0.0.1:{free_port()}"
    node1 = start_node([*common[:1], str(good), *common[1:]], 1, endpoint, tmp_path / "o1.png")
    time.sleep(2.0)
    started = time.monotonic()
    node0 = start_node([*common[:1], str(tmp_path / "missing.safetensors"), *common[1:]], 0, endpoint,
                       tmp_path / "o0.png")
    (_, err0), (_, err1) = (node.communicate(timeout=120) for node in (node0, node1))
    assert time.monotonic() - started < 60
    assert node0.returncode == 1 and node1.returncode == 1, (err0, err1)
    assert err0.strip() == f"error: {tmp_path / 'missing.safetensors'}: no such file", err0
    assert err1.strip() == f"error: node 0 failed: {tmp_path / 'missing.safetensors'}: no such file", err1
    assert not list(tmp_path.glob("o*"))


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


def alive(pid: int) -> bool:
    """A process that exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_killing_vaepar_ends_its_workers(kl_models: dict[str, Path], tmp_path: Path) -> None:
    """SIGKILL of the vaepar process (the OOM killer, a scheduler): its workers die with it."""
    src = save_latents(tmp_path / "big.safetensors", torch.randn(1, 4, 320, 320))
    proc = subprocess.Popen([*VAEPAR, "decode", str(src), "--model", str(kl_models["kl4"]),
                             "--out", str(tmp_path / "out.png"), "--strategy", "tiled", "--tile-size", "32",
                             "--nproc", "2", "--device", "cpu", "--quiet"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while len(pids := worker_pids(proc.pid)) < 2:
        assert time.monotonic() < deadline and proc.poll() is None, "workers never started"
        time.sleep(0.2)
    time.sleep(3.0)
    assert proc.poll() is None, "the job ended before vaepar could be killed"
    proc.kill()
    proc.wait()
    time.sleep(15.0)
    assert [p for p in pids if alive(p)] == [], "workers outlived the vaepar process"
    assert not list(tmp_path.glob("out*")) and not list(tmp_path.glob(".out*"))


@pytest.mark.parametrize("nproc", [1, 2])
def test_an_outer_jobs_environment_is_ignored(kl_models: dict[str, Path], tmp_path: Path, nproc: int) -> None:
    """Started inside a torchrun/SLURM job, vaepar builds its own group: the inherited WORLD_SIZE,
    RANK and MASTER_ADDR/PORT (of a group that is not there) must not make it wait."""
    src = save_latents(tmp_path / "z.safetensors", torch.randn(1, 4, 8, 8))
    env = {**os.environ, "WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port()), "TORCHELASTIC_RUN_ID": "outer"}
    proc = subprocess.run([*VAEPAR, "decode", str(src), "--model", str(kl_models["kl4"]), "--out",
                           str(tmp_path / "out.png"), "--nproc", str(nproc), "--device", "cpu", "--quiet"],
                          capture_output=True, text=True, env=env, timeout=180)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "out.png").is_file()
