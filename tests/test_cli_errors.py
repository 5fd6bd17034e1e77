"""Bad input to `vaepar decode`: one line on stderr, exit code 1, no traceback, no output written.

Every case runs the CLI in-process and must be caught before any worker starts: ``launch.run`` is
replaced by a recorder that fails the test if it is reached. The error console is narrowed to 40
columns so that a message rich would wrap shows up as several lines.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from click.testing import Result
from rich.console import Console
from safetensors.torch import save_file
from typer.testing import CliRunner

from conftest import save_latents
from vaepar import cli, launch

Maker = Callable[[Path], None]


@pytest.fixture(autouse=True)
def narrow_console(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli, "console", Console(stderr=True, width=40))


@pytest.fixture(autouse=True)
def launches(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    calls: list[object] = []
    monkeypatch.setattr(launch, "run", lambda *args: calls.append(args))
    return calls


@pytest.fixture
def out_dir(tmp_path: Path) -> Path:
    (tmp_path / "out").mkdir()
    return tmp_path / "out"


@pytest.fixture
def good(tmp_path: Path) -> Path:
    return save_latents(tmp_path / "good.safetensors", torch.randn(1, 4, 8, 8))


def decode(*args: str | Path, device: str | None = "cpu") -> Result:
    """``vaepar decode --device DEVICE ARGS...`` (a later ``--device`` in ``args`` wins)."""
    argv = ["decode", *(["--device", device] if device else []), *map(str, args)]
    return CliRunner().invoke(cli.app, argv)


def assert_fails(result: Result, out_dir: Path, launches: list[object], *fragments: str, code: int = 1) -> str:
    """Exit ``code`` (1: bad input; 2: bad option), one ``error:`` line on stderr naming
    ``fragments``, nothing written."""
    assert "Traceback" not in result.output, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert result.exit_code == code, result.output
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, f"error message is not one line: {result.stderr!r}"
    line = lines[0]
    assert line.startswith("error: "), line
    for fragment in fragments:
        assert fragment in line, f"{fragment!r} not in {line!r}"
    assert not launches, "workers were launched for bad input"
    assert [p for p in out_dir.rglob("*") if not p.is_dir()] == []
    return line


# -- the latent file -------------------------------------------------------------------------

def latents(z: torch.Tensor, **metadata: str) -> Maker:
    def make(path: Path) -> None:
        save_latents(path, z, **metadata)
    return make


def with_nan() -> torch.Tensor:
    z = torch.randn(1, 4, 8, 8)
    z[0, 1, 2, 3] = float("nan")
    return z


def with_inf() -> torch.Tensor:
    z = torch.randn(1, 4, 8, 8)
    z[0, 0, 0, 0], z[0, 3, 7, 7] = float("inf"), float("-inf")
    return z


def two_tensors(path: Path) -> None:
    save_file({"a": torch.randn(1, 4, 8, 8), "b": torch.randn(1, 4, 8, 8)}, str(path))


LATENT_CASES = [
    pytest.param("nope.safetensors", None, "kl4", [], ["nope.safetensors: no such file"],
                 id="missing-file"),
    pytest.param("x[/b]y.safetensors", None, "kl4", [], ["x[/b]y.safetensors: no such file"],
                 id="missing-file-with-markup-in-name"),
    pytest.param("take[b]2.safetensors", None, "kl4", [], ["take[b]2.safetensors: no such file"],
                 id="missing-file-with-tag-in-name"),
    pytest.param("adir.safetensors", lambda p: p.mkdir(), "kl4", [],
                 ["adir.safetensors: is a folder, expected a .safetensors latent file"],
                 id="unreadable-folder-given-as-file"),
    pytest.param("notes.safetensors", lambda p: p.write_text("these are not latents\n"), "kl4", [],
                 ["notes.safetensors: not a readable safetensors file"], id="text-file"),
    pytest.param("noise.safetensors", lambda p: p.write_bytes(random.Random(0).randbytes(256)),
                 "kl4", [], ["noise.safetensors: not a readable safetensors file"], id="random-bytes"),
    pytest.param("empty.safetensors", lambda p: p.write_bytes(b""), "kl4", [],
                 ["empty.safetensors: not a readable safetensors file"], id="empty-file"),
    pytest.param("two.safetensors", two_tensors, "kl4", [],
                 ["two.safetensors: expected a tensor named 'latents'", "found: a, b"],
                 id="several-tensors-none-named-latents"),
    pytest.param("flat.safetensors", latents(torch.randn(8, 8)), "kl4", [],
                 ["flat.safetensors: expected image latents (B, C, H, W)", "got shape (8, 8)"],
                 id="2d-tensor"),
    pytest.param("video.safetensors", latents(torch.randn(1, 4, 2, 8, 8)), "kl4", [],
                 ["video.safetensors: video latents", "given to the image VAE"],
                 id="5d-tensor-to-image-model"),
    pytest.param("ints.safetensors", latents(torch.ones(1, 4, 8, 8, dtype=torch.int32)), "kl4", [],
                 ["ints.safetensors: latents must be floating point", "int32"], id="integer-tensor"),
    pytest.param("c16.safetensors", latents(torch.randn(1, 16, 8, 8)), "kl4", [],
                 ["c16.safetensors: latents have 16 channels", "expects 4"],
                 id="16-channels-to-4-channel-model"),
    pytest.param("c4.safetensors", latents(torch.randn(1, 4, 8, 8)), "kl16", [],
                 ["c4.safetensors: latents have 4 channels", "expects 16"],
                 id="4-channels-to-16-channel-model"),
    pytest.param("nan.safetensors", latents(with_nan()), "kl4", [],
                 ["nan.safetensors: latents contain non-finite values (1 NaN)"], id="nan"),
    pytest.param("inf.safetensors", latents(with_inf()), "kl4", [],
                 ["inf.safetensors: latents contain non-finite values (2 Inf)"], id="inf"),
    pytest.param("packed.safetensors", latents(torch.randn(1, 16, 16)), "kl4", [],
                 ["packed.safetensors: packed latents need --height/--width"],
                 id="packed-without-size"),
    pytest.param("packed.safetensors", latents(torch.randn(1, 16, 16), height="64", width="64"),
                 "kl4", [], ["packed.safetensors: packed latents (1, 16, 16) do not fit a 64x64 image"],
                 id="packed-size-does-not-fit"),
    pytest.param("packed.safetensors", latents(torch.randn(1, 16, 16), height="big"), "kl4",
                 ["--width", "32"], ["packed.safetensors: metadata 'height' is not an integer"],
                 id="packed-bad-metadata"),
]


@pytest.mark.parametrize("name, make, model, extra, fragments", LATENT_CASES)
def test_bad_latent_file(tmp_path: Path, out_dir: Path, launches: list[object],
                         kl_models: dict[str, Path], name: str, make: Maker | None, model: str,
                         extra: list[str], fragments: list[str]) -> None:
    source = tmp_path / name
    if make is not None:
        make(source)
    result = decode(source, "--out", out_dir / "out.png", "--model", kl_models[model], *extra)
    assert_fails(result, out_dir, launches, *fragments)


# -- the model -------------------------------------------------------------------------------

def folder(config: str | None) -> Callable[[Path], str]:
    def make(tmp_path: Path) -> str:
        (tmp_path / "model").mkdir()
        if config is not None:
            (tmp_path / "model" / "config.json").write_text(config)
        return str(tmp_path / "model")
    return make


def a_file(tmp_path: Path) -> str:
    (tmp_path / "weights.bin").write_bytes(b"\0" * 8)
    return str(tmp_path / "weights.bin")


MODEL_CASES = [
    pytest.param(lambda t: "no-such-model", ["unknown model 'no-such-model'", "sd15"],
                 id="unknown-model-or-preset"),
    pytest.param(lambda t: "./does/not/exist/", ["model folder ./does/not/exist/ does not exist"],
                 id="missing-relative-folder"),
    pytest.param(lambda t: "models/sd/vae", ["model folder models/sd/vae does not exist"],
                 id="missing-nested-relative-folder"),
    pytest.param(lambda t: str(t / "gone"), ["does not exist"], id="missing-absolute-folder"),
    pytest.param(folder(None), ["no diffusers config found", "config.json"],
                 id="folder-without-config"),
    pytest.param(folder("{not json"), ["cannot read", "config.json"], id="config-not-json"),
    pytest.param(folder(json.dumps({"_class_name": "UNet2DModel"})),
                 ["config.json describes a UNet2DModel", "supported: AutoencoderKL"],
                 id="config-not-a-vae"),
    pytest.param(a_file, ["weights.bin is not a folder"], id="model-is-a-file"),
]


@pytest.mark.parametrize("model, fragments", MODEL_CASES)
def test_bad_model(tmp_path: Path, out_dir: Path, launches: list[object], good: Path,
                   monkeypatch: pytest.MonkeyPatch, model: Callable[[Path], str],
                   fragments: list[str]) -> None:
    monkeypatch.chdir(tmp_path)
    name = model(tmp_path)
    line = assert_fails(decode(good, "--out", out_dir / "out.png", "--model", name),
                        out_dir, launches, *fragments)
    assert name in line


def test_no_model_and_no_metadata(out_dir: Path, launches: list[object], good: Path) -> None:
    assert_fails(decode(good, "--out", out_dir / "out.png"), out_dir, launches,
                 "good.safetensors: no --model given")


# -- worker and tile options -----------------------------------------------------------------

OPTION_CASES = [
    pytest.param(["--strategy", "bogus"], ["unknown --strategy 'bogus'", "auto, none, tiled"],
                 id="unknown-strategy"),
    pytest.param(["--nproc", "0"], ["--nproc must be at least 1, got 0"], id="nproc-0"),
    pytest.param(["--threads", "0"], ["threads must be at least 1, got 0"], id="threads-0"),
    pytest.param(["--threads", "-2"], ["threads must be at least 1, got -2"], id="threads-negative"),
    pytest.param(["--dtype", "float8"], ["dtype must be one of", "'float8'"], id="unknown-dtype"),
    pytest.param(["--device", "tpu"], ["--device must be cpu or cuda, got 'tpu'"], id="unknown-device"),
    pytest.param(["--backend", "mpi"], ["--backend must be one of nccl, gloo, got 'mpi'"], id="unknown-backend"),
    pytest.param(["--nnodes", "2"], ["several nodes need --rdzv-endpoint"], id="nodes-without-endpoint"),
    pytest.param(["--tile-size", "30"], ["--tile-size must be a positive multiple of the model's scale (4), got 30"],
                 id="tile-size-not-multiple-of-scale"),
    pytest.param(["--tile-size", "0"], ["--tile-size must be a positive multiple", "got 0"],
                 id="tile-size-0"),
    pytest.param(["--tile-overlap", "0.5"], ["--tile-overlap must be in [0, 0.5), got 0.5"],
                 id="tile-overlap-0.5"),
    pytest.param(["--tile-overlap", "-0.1"], ["--tile-overlap must be in [0, 0.5), got -0.1"],
                 id="tile-overlap-negative"),
]


# Options that contradict each other or would be ignored: errors, never silently dropped.
CONFLICT_CASES = [
    pytest.param(["--gpus", "2", "--nproc", "3"], ["--gpus 2 already sets the number of workers; drop --nproc 3"],
                 id="gpus-and-nproc"),
    pytest.param(["--halo", "4"], ["--halo applies to --strategy patch only, not auto"], id="halo-without-patch"),
    pytest.param(["--backend", "nccl"], ["--backend nccl needs --device cuda"], id="nccl-on-cpu"),
    pytest.param(["--strategy", "shard", "--tile-size", "32"], ["--tile-size applies to --strategy tiled or auto"],
                 id="tile-size-with-shard"),
    pytest.param(["--strategy", "patch", "--tile-overlap", "0.1"], ["--tile-overlap applies to", "not patch"],
                 id="tile-overlap-with-patch"),
    pytest.param(["--raw", "--scaling-factor", "2"], ["--raw skips (un)scaling", "--scaling-factor"],
                 id="raw-and-scaling-factor"),
    pytest.param(["--no-upcast"], ["--no-upcast only matters with --dtype float16"], id="no-upcast-without-fp16"),
    pytest.param(["--quiet", "--verbose"], ["--quiet and --verbose contradict"], id="quiet-and-verbose"),
    pytest.param(["--fps", "8"], ["--fps/--quality apply to MP4 output, not PNG"], id="fps-for-png"),
    pytest.param(["--format", "safetensors"], ["--format safetensors contradicts --out out.png"],
                 id="format-against-suffix"),
    pytest.param(["--height", "32", "--width", "32"], ["--height/--width unpack packed latents", "(1, 4, 8, 8)"],
                 id="height-for-unpacked-latents"),
    pytest.param(["--nnodes", "2", "--node-rank", "1", "--rdzv-endpoint", "127.0.0.1:1"],
                 ["nodes other than --node-rank 0 do not read the inputs: give them --model"],
                 id="other-node-without-model"),
]


@pytest.mark.parametrize("extra, fragments", OPTION_CASES + CONFLICT_CASES)
def test_bad_option(out_dir: Path, launches: list[object], kl_models: dict[str, Path], good: Path,
                    monkeypatch: pytest.MonkeyPatch, extra: list[str], fragments: list[str]) -> None:
    def announce(spec: launch.LaunchSpec, message: str) -> None:
        if spec.nnodes > 1:
            launches.append(("announce", message))

    monkeypatch.setattr(launch, "announce_failure", announce)
    model = [] if "--node-rank" in extra else ["--model", str(kl_models["kl4"])]
    result = decode(good, "--out", out_dir / "out.png", *model, *extra)
    if "--node-rank" in extra:  # the failing node tells the others, then stops
        assert [call[0] for call in launches] == ["announce"]
        launches.clear()
    assert_fails(result, out_dir, launches, *fragments, code=2)


def test_overlap_out_of_step_with_stride(tmp_path: Path, out_dir: Path, launches: list[object],
                                         kl_models: dict[str, Path]) -> None:
    # tile 32 px = 8 latents at scale 4; overlap 0.3: stride int(8 * 0.7) = 5 latents = 20 px,
    # but each tile keeps 32 - int(32 * 0.3) = 23 px, so the cores drift from the stride.
    source = save_latents(tmp_path / "big.safetensors", torch.randn(1, 4, 16, 16))
    result = decode(source, "--out", out_dir / "out.png", "--model", kl_models["kl4"],
                    "--tile-size", "32", "--tile-overlap", "0.3")
    assert_fails(result, out_dir, launches, "tile size 32 with overlap 0.3", "out of step")


@pytest.mark.parametrize("extra, device, code, fragments", [
    pytest.param(["--gpus", "1"], None, 1, ["CUDA is not available on this machine"], id="gpus-without-cuda"),
    pytest.param([], "cuda", 1, ["CUDA is not available on this machine"], id="device-cuda-without-cuda"),
    pytest.param(["--gpus", "1"], "cpu", 2, ["--gpus runs on cuda", "--device cpu"], id="gpus-with-device-cpu"),
    pytest.param(["--threads", "2"], "cuda", 2, ["--threads sets CPU threads", "no effect with --device cuda"],
                 id="threads-on-cuda"),
])
def test_no_cuda(out_dir: Path, launches: list[object], kl_models: dict[str, Path], good: Path,
                 monkeypatch: pytest.MonkeyPatch, extra: list[str], device: str | None, code: int,
                 fragments: list[str]) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    result = decode(good, "--out", out_dir / "out.png", "--model", kl_models["kl4"], *extra,
                    device=device)
    assert_fails(result, out_dir, launches, *fragments, code=code)


# -- the output path -------------------------------------------------------------------------

def test_out_under_a_file(tmp_path: Path, out_dir: Path, launches: list[object],
                          kl_models: dict[str, Path], good: Path) -> None:
    blocker = out_dir / "somefile.txt"
    blocker.write_text("keep me")
    result = decode(good, "--out", blocker / "out.png", "--model", kl_models["kl4"])
    blocker.unlink()  # assert_fails checks the folder holds nothing else
    assert_fails(result, out_dir, launches, "somefile.txt/out.png: cannot write here",
                 "somefile.txt is a file, not a folder")


@pytest.mark.parametrize("out, fragments", [
    pytest.param("missing/out.png", ["missing/out.png: cannot write here", "missing is not an existing folder"],
                 id="parent-folder-missing"),
    pytest.param("x.jpg", ["x.jpg: unsupported output format '.jpg'", ".png, .safetensors"],
                 id="unsupported-suffix"),
    pytest.param("x.mp4", ["x.mp4: unsupported output format '.mp4'"], id="mp4-for-image-model"),
])
def test_bad_output_path(out_dir: Path, launches: list[object], kl_models: dict[str, Path],
                         good: Path, out: str, fragments: list[str]) -> None:
    result = decode(good, "--out", out_dir / out, "--model", kl_models["kl4"])
    assert_fails(result, out_dir, launches, *fragments)
    assert not (out_dir / "missing").exists()


def test_out_is_a_folder_with_a_suffix(out_dir: Path, launches: list[object],
                                       kl_models: dict[str, Path], good: Path) -> None:
    (out_dir / "taken.png").mkdir()
    result = decode(good, "--out", out_dir / "taken.png", "--model", kl_models["kl4"])
    assert_fails(result, out_dir, launches, "taken.png: is a folder; give a file name")


def test_several_inputs_out_is_a_file(tmp_path: Path, out_dir: Path, launches: list[object],
                                      kl_models: dict[str, Path], good: Path) -> None:
    other = save_latents(tmp_path / "other.safetensors", torch.randn(1, 4, 8, 8))
    existing = out_dir / "result.png"
    existing.write_text("not a folder")
    result = decode(good, other, "--out", existing, "--model", kl_models["kl4"])
    assert existing.read_text() == "not a folder"
    existing.unlink()
    assert_fails(result, out_dir, launches,
                 "result.png: several inputs need --out to be a folder, but it is a file")


def test_several_inputs_one_bad(tmp_path: Path, out_dir: Path, launches: list[object],
                                kl_models: dict[str, Path], good: Path) -> None:
    bad = save_latents(tmp_path / "bad.safetensors", with_nan())
    result = decode(good, bad, "--out", out_dir / "results", "--model", kl_models["kl4"])
    assert_fails(result, out_dir, launches, "bad.safetensors: latents contain non-finite values")
    assert not (out_dir / "results").exists(), "output folder created for a failed run"


def test_several_inputs_same_name(tmp_path: Path, out_dir: Path, launches: list[object],
                                  kl_models: dict[str, Path], good: Path) -> None:
    (tmp_path / "sub").mkdir()
    twin = save_latents(tmp_path / "sub" / "good.safetensors", torch.randn(1, 4, 8, 8))
    result = decode(good, twin, "--out", out_dir / "results", "--model", kl_models["kl4"])
    assert_fails(result, out_dir, launches, "several inputs share a file name")


def test_several_inputs_out_parent_missing(tmp_path: Path, out_dir: Path, launches: list[object],
                                           kl_models: dict[str, Path], good: Path) -> None:
    other = save_latents(tmp_path / "other.safetensors", torch.randn(1, 4, 8, 8))
    result = decode(good, other, "--out", out_dir / "a" / "b", "--model", kl_models["kl4"])
    assert_fails(result, out_dir, launches, "cannot create the output folder", "a is not an existing folder")


# -- the real console, in a narrow terminal --------------------------------------------------

def test_error_is_one_line_in_a_narrow_terminal(tmp_path: Path, out_dir: Path,
                                                kl_models: dict[str, Path]) -> None:
    source = save_latents(tmp_path / "big.safetensors", torch.randn(1, 4, 16, 16))
    env = {**os.environ, "COLUMNS": "40", "LINES": "20"}
    proc = subprocess.run(
        [sys.executable, "-m", "vaepar", "decode", str(source), "--out", str(out_dir / "out.png"),
         "--model", str(kl_models["kl4"]), "--device", "cpu", "--tile-overlap", "0.3"],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and len(lines[0]) > 40, proc.stderr
    assert lines[0].startswith("error: ") and "out of step" in lines[0]
    assert list(out_dir.iterdir()) == []


@pytest.mark.parametrize("backend, fragments", [
    pytest.param([], ["asked for 2 GPU workers but this machine has 1 CUDA device(s)",
                      "NCCL needs one GPU per worker", "--backend gloo"], id="default-nccl"),
    pytest.param(["--backend", "nccl"], ["NCCL needs one GPU per worker"], id="nccl"),
])
def test_nccl_refuses_to_share_a_gpu(out_dir: Path, launches: list[object], kl_models: dict[str, Path], good: Path,
                                     monkeypatch: pytest.MonkeyPatch, backend: list[str], fragments: list[str]) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    result = decode(good, "--out", out_dir / "out.png", "--model", kl_models["kl4"], "--gpus", "2", *backend,
                    device=None)
    assert_fails(result, out_dir, launches, *fragments)
