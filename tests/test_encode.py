"""`vaepar encode`: bit-identical to diffusers' tiled encode on 1-3 workers, round trips, bad input."""

from __future__ import annotations

from pathlib import Path

import imageio.v2 as imageio
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from vaepar.cli import app

TILE = 32
# model: {name: pixel shape}. KL: 76x92 and 40x36 don't divide the grid, 24x20 fits one tile.
# Wan 2.2 tiles slice patchified pixels (96x80 -> 48x40), exactly as diffusers does.
CASES = {
    "kl4": {"b1": (1, 3, 76, 92), "b2": (2, 3, 40, 36), "small": (1, 3, 24, 20)},
    "kl16": {"b1": (1, 3, 76, 92), "b2": (2, 3, 40, 36)},
    "flux2": {"b1": (1, 3, 76, 92), "b2": (2, 3, 40, 36)},
    "wan21": {"b1": (1, 3, 5, 40, 56), "b2": (2, 3, 1, 48, 40)},
    "wan22": {"b1": (1, 3, 5, 96, 80), "b2": (2, 3, 1, 64, 48)},
}


def reference_encode(model_dir: Path, x: torch.Tensor, tile: int | None) -> torch.Tensor:
    """diffusers' own encode (tiled with the same attributes), single-threaded, mode of the posterior."""
    from diffusers import AutoencoderKLWan

    from conftest import vae_class

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        if x.ndim == 5:
            vae = AutoencoderKLWan.from_pretrained(model_dir).eval()
            if tile is not None:
                stride = int(tile * 0.75)
                vae.enable_tiling(tile, tile, stride, stride)
        else:
            vae = vae_class(model_dir).from_pretrained(model_dir).eval()
            if tile is not None:
                vae.enable_tiling()
                vae.tile_sample_min_size = tile
                vae.tile_latent_min_size = tile // 2 ** (len(vae.config.block_out_channels) - 1)
        with torch.no_grad():
            return vae.encode(x).latent_dist.mode()
    finally:
        torch.set_num_threads(threads)


def cli(*args: str) -> str:
    result = CliRunner().invoke(app, [*args, "--device", "cpu", "--quiet"])
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="module")
def models(kl_models: dict[str, Path], flux2_models: dict[str, Path], wan_models: dict[str, Path]) -> dict[str, Path]:
    return {**kl_models, **flux2_models, **wan_models}


# Three workers on the 4-channel KL, FLUX.2 and Wan 2.2 models; one and two on all (worker
# start-up is the cost here).
MATRIX = [(m, n) for m in CASES for n in (1, 2, 3) if n < 3 or m in ("kl4", "flux2", "wan22")]


@pytest.mark.parametrize("model,nproc", MATRIX)
def test_tiled_encode_is_bit_identical_to_diffusers(models: dict[str, Path], tmp_path: Path, model: str, nproc: int) -> None:
    g = torch.Generator().manual_seed(nproc)
    xs = {name: torch.rand(shape, generator=g) * 2 - 1 for name, shape in CASES[model].items()}
    for name, x in xs.items():
        save_file({"sample": x}, str(tmp_path / f"{name}.safetensors"))
    cli("encode", *(str(tmp_path / f"{n}.safetensors") for n in xs), "--model", str(models[model]),
        "--out", str(tmp_path / "out"), "--strategy", "tiled", "--tile-size", str(TILE), "--threads", "1",
        "--raw", "--nproc", str(nproc))
    for name, x in xs.items():
        got = load_file(tmp_path / "out" / f"{name}.safetensors")["latents"]
        want = reference_encode(models[model], x, TILE)
        assert got.shape == want.shape, name
        assert torch.equal(got, want), f"{name}: max diff {(got - want).abs().max().item()}"


def test_untiled_and_scaled_encode(models: dict[str, Path], tmp_path: Path) -> None:
    """--strategy none equals untiled diffusers; default scaling is (z - shift) * scaling_factor."""
    x = torch.rand(1, 3, 40, 36, generator=torch.Generator().manual_seed(9)) * 2 - 1
    save_file({"sample": x}, str(tmp_path / "x.safetensors"))
    cli("encode", str(tmp_path / "x.safetensors"), "--model", str(models["kl16"]), "--out",
        str(tmp_path / "z.safetensors"), "--strategy", "none", "--threads", "1")
    want = (reference_encode(models["kl16"], x, None) - 0.1159) * 0.5
    assert torch.equal(load_file(tmp_path / "z.safetensors")["latents"], want)
    with safe_open(str(tmp_path / "z.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta == {"model": str(models["kl16"].resolve()), "scaled": "true", "height": "40", "width": "36"}


def test_sampling_is_seeded(models: dict[str, Path], tmp_path: Path) -> None:
    x = torch.rand(1, 3, 24, 20, generator=torch.Generator().manual_seed(2)) * 2 - 1
    save_file({"sample": x}, str(tmp_path / "x.safetensors"))
    outs = {}
    for tag, extra in {"mode": [], "s1": ["--sample", "--seed", "1"], "s1b": ["--sample", "--seed", "1"],
                       "s2": ["--sample", "--seed", "2"]}.items():
        cli("encode", str(tmp_path / "x.safetensors"), "--model", str(models["kl4"]), "--raw", "--threads", "1",
            "--out", str(tmp_path / f"{tag}.safetensors"), *extra)
        outs[tag] = load_file(tmp_path / f"{tag}.safetensors")["latents"]
    assert torch.equal(outs["s1"], outs["s1b"])
    assert not torch.equal(outs["s1"], outs["s2"]) and not torch.equal(outs["s1"], outs["mode"])


def test_png_round_trip_through_the_cli(models: dict[str, Path], tmp_path: Path) -> None:
    rgb = (np.random.default_rng(0).random((44, 60, 3)) * 255).astype(np.uint8)
    Image.fromarray(rgb).save(tmp_path / "in.png")
    cli("encode", str(tmp_path / "in.png"), "--model", str(models["kl4"]), "--out", str(tmp_path / "z.safetensors"),
        "--nproc", "2", "--strategy", "tiled", "--tile-size", str(TILE))
    cli("decode", str(tmp_path / "z.safetensors"), "--out", str(tmp_path / "out.png"), "--nproc", "2")
    assert Image.open(tmp_path / "out.png").size == (60, 44)


def test_mp4_round_trip_through_the_cli(models: dict[str, Path], tmp_path: Path) -> None:
    frames = (np.random.default_rng(1).random((9, 48, 64, 3)) * 255).astype(np.uint8)
    imageio.mimwrite(tmp_path / "in.mp4", list(frames), fps=8, macro_block_size=1)
    cli("encode", str(tmp_path / "in.mp4"), "--model", str(models["wan21"]), "--out", str(tmp_path / "z.safetensors"),
        "--frames", "5")
    assert load_file(tmp_path / "z.safetensors")["latents"].shape == (1, 4, 2, 6, 8)
    cli("decode", str(tmp_path / "z.safetensors"), "--out", str(tmp_path / "out.mp4"))
    with imageio.get_reader(tmp_path / "out.mp4") as reader:
        decoded = [frame for frame in reader]
    assert len(decoded) == 5 and decoded[0].shape == (48, 64, 3)


def test_fit_crop_and_resize(models: dict[str, Path], tmp_path: Path) -> None:
    Image.fromarray(np.zeros((30, 43, 3), np.uint8)).save(tmp_path / "odd.png")
    for how, size in (("crop", (7, 10)), ("resize", (8, 11))):
        cli("encode", str(tmp_path / "odd.png"), "--model", str(models["kl4"]), "--fit", how,
            "--out", str(tmp_path / f"{how}.safetensors"))
        assert load_file(tmp_path / f"{how}.safetensors")["latents"].shape[-2:] == size


def bad_inputs(tmp_path: Path) -> dict[str, tuple[Path, str, list[str], str]]:
    """case: (input, model, extra args, expected message fragment)."""
    Image.fromarray(np.zeros((30, 44, 3), np.uint8)).save(tmp_path / "odd.png")
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "ok.png")
    (tmp_path / "garbage.png").write_bytes(b"not a png")
    save_file({"sample": torch.full((1, 3, 8, 8), 1.5)}, str(tmp_path / "range.safetensors"))
    save_file({"sample": torch.full((1, 3, 8, 8), float("nan"))}, str(tmp_path / "nan.safetensors"))
    save_file({"sample": torch.zeros(1, 3, 4, 16, 16)}, str(tmp_path / "frames4.safetensors"))
    save_file({"sample": torch.zeros(1, 3, 5, 16, 16)}, str(tmp_path / "video.safetensors"))
    return {
        "missing": (tmp_path / "nope.png", "kl4", [], "no such file"),
        "garbage": (tmp_path / "garbage.png", "kl4", [], "not a readable image"),
        "size": (tmp_path / "odd.png", "kl4", [], "not a multiple of 4"),
        "range": (tmp_path / "range.safetensors", "kl4", [], "must lie in [-1, 1]"),
        "nan": (tmp_path / "nan.safetensors", "kl4", [], "NaN"),
        "image-to-video": (tmp_path / "ok.png", "wan21", [], "an image was given to the video VAE"),
        "video-to-image": (tmp_path / "video.safetensors", "kl4", [], "a video was given to the image VAE"),
        "frames": (tmp_path / "frames4.safetensors", "wan21", [], "AutoencoderKLWan encodes 1 + 4k frames"),
        "bad-fit": (tmp_path / "odd.png", "kl4", ["--fit", "stretch"], "--fit must be one of"),
    }


@pytest.mark.parametrize("case", ["missing", "garbage", "size", "range", "nan", "image-to-video",
                                  "video-to-image", "frames", "bad-fit"])
def test_bad_input_is_one_line_and_writes_nothing(models: dict[str, Path], tmp_path: Path, case: str) -> None:
    src, model, extra, fragment = bad_inputs(tmp_path)[case]
    out = tmp_path / "out" / "z.safetensors"
    out.parent.mkdir()
    result = CliRunner().invoke(app, ["encode", str(src), "--model", str(models[model]), "--out", str(out),
                                      "--device", "cpu", *extra])
    assert result.exit_code == (2 if case == "bad-fit" else 1)  # 2: a bad option
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0], result.stderr
    assert list(out.parent.iterdir()) == []
