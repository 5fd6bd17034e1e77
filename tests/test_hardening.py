"""What must never be silent: rank order across nodes, fp16 overflow, internal errors, models
named like presets, ignored options, and the diffusers releases vaepar supports."""

from __future__ import annotations

import re
import shutil
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file
from typer.testing import CliRunner

from conftest import make_kl, save_latents
from vaepar import compat, launch, worker
from vaepar.cli import app
from vaepar.errors import InternalError, VaeparError

ROOT = Path(__file__).resolve().parent.parent


def run_cli(*args: str | Path) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


# -- ranks follow --node-rank ------------------------------------------------------------------

def test_ranks_follow_node_rank_not_rendezvous_order() -> None:
    seen = [(1, 0, None), (1, 1, None), (0, 0, None), (0, 1, None)]  # the rendezvous put node 1 first
    assert [launch.assign_rank(seen, me) for me in range(4)] == [2, 3, 0, 1]


def test_a_failed_node_names_itself_and_the_others_name_it() -> None:
    seen = [(1, 0, None), (0, 0, "z.safetensors: no such file"), (0, 1, "z.safetensors: no such file")]
    with pytest.raises(VaeparError, match=r"^z\.safetensors: no such file$"):
        launch.assign_rank(seen, 1)
    with pytest.raises(VaeparError, match=r"^node 0 failed: z\.safetensors: no such file$"):
        launch.assign_rank(seen, 0)


def test_two_nodes_with_the_same_node_rank_are_refused() -> None:
    with pytest.raises(VaeparError, match="several nodes were started with --node-rank 0"):
        launch.assign_rank([(0, 0, None), (0, 0, None)], 1)


# -- internal errors -----------------------------------------------------------------------------

def boom_on_rank_1() -> None:
    import os

    if os.environ["RANK"] == "1":
        raise RuntimeError("boom in a worker")


def test_a_workers_internal_error_is_reported_as_one_with_its_traceback() -> None:
    with pytest.raises(InternalError, match=r"^worker rank 1 failed: RuntimeError: boom in a worker$") as info:
        launch.run(launch.LaunchSpec(nproc=2), boom_on_rank_1)
    assert "boom_on_rank_1" in info.value.traceback


@pytest.mark.parametrize("debug", [False, True])
def test_an_internal_error_is_one_line_unless_debug(kl_models: dict[str, Path], tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch, debug: bool) -> None:
    def broken(self: worker.Worker, job: worker.DecodeJob) -> None:
        raise ValueError("a bug deep inside torch")

    monkeypatch.setattr(worker.Worker, "decode", broken)
    src = save_latents(tmp_path / "z.safetensors", torch.randn(1, 4, 8, 8))
    code, out, err = run_cli("decode", src, "--model", kl_models["kl4"], "--out", tmp_path / "o.png",
                             "--device", "cpu", "--quiet", *(["--debug"] if debug else []))
    assert code == 3
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: internal error (a bug in vaepar") and "ValueError: a bug deep inside torch" in last
    if debug:
        assert "Traceback" in err and "in broken" in err
    else:
        assert len(err.strip().splitlines()) == 1 and "--debug" in last
    assert not list(tmp_path.glob("o*"))


# -- fp16 ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def overflowing(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A VAE (config: force_upcast) whose first decoder convolution overflows float16, and latents."""
    from diffusers import AutoencoderKL

    root = tmp_path_factory.mktemp("fp16")
    path = make_kl(root / "hot")
    vae = AutoencoderKL.from_pretrained(path)
    assert vae.config.force_upcast
    with torch.no_grad():
        vae.decoder.conv_in.weight.mul_(1e5)  # activations ~1e5 > 65504, the float16 maximum
    vae.save_pretrained(path)
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3)) * 4
    return path, save_latents(root / "z.safetensors", z)


def test_float16_is_upcast_where_the_config_asks(overflowing: tuple[Path, Path], tmp_path: Path) -> None:
    model, src = overflowing
    outs = {}
    for dtype in ("float16", "float32"):
        code, _, err = run_cli("decode", src, "--model", model, "--raw", "--dtype", dtype, "--device", "cpu",
                               "--threads", "1", "--out", tmp_path / f"{dtype}.safetensors", "--quiet")
        assert code == 0, err
        outs[dtype] = load_file(tmp_path / f"{dtype}.safetensors")["sample"]
    assert torch.isfinite(outs["float16"]).all()
    assert torch.equal(outs["float16"], outs["float32"])  # computed in float32, as pipelines do


def test_a_non_finite_result_is_an_error_and_writes_nothing(overflowing: tuple[Path, Path], tmp_path: Path) -> None:
    model, src = overflowing
    code, out, err = run_cli("decode", src, "--model", model, "--raw", "--dtype", "float16", "--no-upcast",
                             "--device", "cpu", "--out", tmp_path / "black.png", "--quiet")
    assert code == 1 and out == ""
    assert len(err.strip().splitlines()) == 1, err
    assert re.search(r"the decoded result has non-finite values \(\d+ NaN.*computed in float16", err), err
    assert "drop --no-upcast" in err and "--dtype bfloat16 or float32" in err
    assert list(tmp_path.iterdir()) == []


# -- a local folder named like a preset ----------------------------------------------------------

def test_local_folder_named_like_a_preset_round_trips_offline(kl_models: dict[str, Path], tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    work = tmp_path / "work"
    shutil.copytree(kl_models["kl4"], work / "sdxl")
    pixels = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(work / "img.png")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(work)
    for name in ("./sdxl", "sdxl"):
        code, _, err = run_cli("encode", "img.png", "--model", name, "--out", f"z{len(name)}.safetensors",
                               "--device", "cpu", "--quiet")
        assert code == 0, err
        with safe_open(f"z{len(name)}.safetensors", "pt") as f:
            assert f.metadata()["model"] == str((work / "sdxl").resolve())
    monkeypatch.chdir(tmp_path)  # elsewhere: only the recorded absolute path can find the model
    code, _, err = run_cli("decode", work / "z6.safetensors", "--out", "back.safetensors", "--device", "cpu",
                           "--quiet")
    assert code == 0, err
    code, _, err = run_cli("decode", work / "z6.safetensors", "--model", work / "sdxl", "--out",
                           "explicit.safetensors", "--device", "cpu", "--quiet")
    assert code == 0, err
    assert torch.equal(load_file("back.safetensors")["sample"], load_file("explicit.safetensors")["sample"])


# -- ignored or conflicting options (encode; decode's are in test_cli_errors) -------------------

@pytest.fixture
def no_launch(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    calls: list[object] = []
    monkeypatch.setattr(launch, "run", lambda *args: calls.append(args))
    return calls


@pytest.mark.parametrize("extra, fragment", [
    pytest.param(["--seed", "3"], "--seed applies to --sample", id="seed-without-sample"),
    pytest.param(["--frames", "5"], "--frames applies to video files", id="frames-for-an-image"),
    pytest.param(["--fit", "stretch"], "--fit must be one of crop, resize, got 'stretch'", id="bad-fit-that-fits"),
    pytest.param(["--strategy", "none", "--halo", "2"], "--halo applies to --strategy patch only",
                 id="halo-without-patch"),
])
def test_encode_refuses_ignored_options(kl_models: dict[str, Path], tmp_path: Path, no_launch: list[object],
                                        extra: list[str], fragment: str) -> None:
    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(tmp_path / "img.png")
    code, out, err = run_cli("encode", tmp_path / "img.png", "--model", kl_models["kl4"], "--out",
                             tmp_path / "z.safetensors", "--device", "cpu", *extra)
    assert (code, out) == (2, "") and not no_launch
    assert len(err.strip().splitlines()) == 1 and fragment in err, err


def test_scaling_factor_for_wan_is_refused(wan_models: dict[str, Path], tmp_path: Path,
                                           no_launch: list[object]) -> None:
    src = save_latents(tmp_path / "v.safetensors", torch.randn(1, 4, 2, 8, 8))
    code, _, err = run_cli("decode", src, "--model", wan_models["wan21"], "--out", tmp_path / "v.mp4",
                           "--scaling-factor", "0.5", "--device", "cpu")
    assert code == 2 and not no_launch
    assert "--scaling-factor apply to AutoencoderKL latents" in err and "latents_mean/latents_std" in err


def test_tile_size_makes_auto_tile_on_several_workers(kl_models: dict[str, Path]) -> None:
    """auto with an explicit --tile-size uses it (tiled) rather than dropping it for shard."""
    from vaepar.vae import resolve

    spec = resolve(str(kl_models["kl4"]))
    for tile, want in ((None, "shard"), (32, "tiled")):
        cfg = worker.WorkerConfig(model=spec, tile_size=tile)
        assert worker.plan_job(cfg, "decode", (1, 4, 19, 23), world=2)[0] == want


# -- supported diffusers releases ----------------------------------------------------------------

def test_pyproject_pins_the_range_vaepar_checks() -> None:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert compat.requirement() in deps


def test_unsupported_diffusers_fails_early(monkeypatch: pytest.MonkeyPatch) -> None:
    import diffusers

    compat.check_diffusers()  # the installed release is supported
    low, high = compat.DIFFUSERS
    compat.check_diffusers(low)
    for version in ("0.35.2", high):
        with pytest.raises(VaeparError, match=rf"diffusers {version} is not supported.*pip install"):
            compat.check_diffusers(version)
    monkeypatch.setattr(diffusers, "__version__", "0.20.0")
    code, _, err = run_cli("decode", "x.safetensors", "--model", "tiny", "--out", "x.png")
    assert code == 1 and "diffusers 0.20.0 is not supported" in err
    monkeypatch.setenv("VAEPAR_ANY_DIFFUSERS", "1")
    compat.check_diffusers("0.20.0")


def test_a_vae_without_the_internals_vaepar_drives_is_refused(wan_models: dict[str, Path]) -> None:
    from diffusers import AutoencoderKLWan

    vae = AutoencoderKLWan.from_pretrained(wan_models["wan21"])
    compat.check_model(vae)
    vae.clear_cache = lambda: None  # a release whose caches live elsewhere
    del vae._feat_map
    with pytest.raises(VaeparError, match=r"AutoencoderKLWan in diffusers .* lacks _feat_map"):
        compat.check_model(vae)
