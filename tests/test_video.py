"""Wan 2.1 / 2.2 video latents: `vaepar decode` equals diffusers' AutoencoderKLWan decode bit for bit
on 1-3 workers, and writes MP4, per-frame PNG and safetensors outputs; bad video input fails early.

The models are tiny random AutoencoderKLWan folders (conftest.make_wan): Wan 2.1 at 8x and Wan 2.2
(residual, 2x2 patches) at 16x spatially, both 4x in time, so F latent frames decode to 4F - 3.
"""

from __future__ import annotations

from pathlib import Path

import imageio.v2 as imageio
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file
from typer.testing import CliRunner

from conftest import WAN_MEAN, WAN_STD, WAN_VARIANTS, reference_wan_decode, save_latents
from vaepar import cli, launch, outputs, plan, worker
from vaepar.cli import app
from vaepar.errors import VaeparError
from vaepar.vae import resolve

# Tile sizes in pixels: 4 latents per tile, stride int(T * 0.75) = 3 latents, so tiny latents make
# several tiles. Wan 2.1: 32 px, blend 8 px; Wan 2.2: 64 px, blend and crop in patchified pixels
# (32 - 24 = 8 of them).
TILES = {"wan21": 32, "wan22": 64}

# name: (batch, frames, h, w), latent sizes. diffusers starts a tile at every multiple of the
# stride, so every tiled case ends in a short edge tile (1 to 3 latents).
CASES = {
    "f1": (1, 1, 7, 9),         # one frame; 3x3 tiles, the last row 1 latent, the last column 3
    "f2_batch2": (2, 2, 5, 6),  # two frames, batch of two; 2x2 tiles
    "f3": (1, 3, 8, 4),         # three frames; 3x2 tiles, the last column 1 latent wide
    "two_tiles": (1, 2, 4, 6),  # 1x2 tiles: with 3 workers one idles
    "one_tile": (1, 3, 3, 4),   # fits in one tile: decoded untiled, as diffusers does
}


def frames_out(f: int) -> int:
    """Wan's causal temporal upsampling: the first latent frame gives 1 frame, each other 4."""
    return 4 * f - 3


def make_inputs(folder: Path, cases: dict[str, tuple[int, int, int, int]],
                seed: int = 0) -> dict[str, torch.Tensor]:
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    zs = {name: torch.randn(b, 4, f, h, w, generator=g) for name, (b, f, h, w) in cases.items()}
    for name, z in zs.items():
        save_latents(folder / f"{name}.safetensors", z)
    return zs


def decode(*args: str | Path) -> None:
    result = CliRunner().invoke(app, ["decode", *map(str, args), "--device", "cpu", "--quiet"])
    assert result.exit_code == 0, result.output


def assert_equal(got: torch.Tensor, want: torch.Tensor, name: str) -> None:
    assert got.shape == want.shape, f"{name}: {tuple(got.shape)} != {tuple(want.shape)}"
    assert torch.equal(got, want), f"{name}: max diff {(got - want).abs().max().item()}"


@pytest.fixture(scope="module")
def tiled_inputs(tmp_path_factory: pytest.TempPathFactory, wan_models: dict[str, Path]) -> dict:
    """The latent files of CASES and diffusers' tiled decode of each, per model (computed once)."""
    folder = tmp_path_factory.mktemp("wan_in")
    zs = make_inputs(folder, CASES)
    refs = {m: {n: reference_wan_decode(wan_models[m], z, tile=TILES[m]) for n, z in zs.items()}
            for m in WAN_VARIANTS}
    return {"folder": folder, "zs": zs, "refs": refs}


# -- bit-exact decode --------------------------------------------------------------------------

@pytest.mark.parametrize("nproc", [1, 2, 3])
@pytest.mark.parametrize("model", list(WAN_VARIANTS))
def test_tiled_decode_is_bit_identical_to_diffusers(
    wan_models: dict[str, Path], tiled_inputs: dict, tmp_path: Path, model: str, nproc: int
) -> None:
    zs, scale = tiled_inputs["zs"], WAN_VARIANTS[model]
    decode(*(tiled_inputs["folder"] / f"{n}.safetensors" for n in zs), "--model", wan_models[model],
           "--out", tmp_path / "out", "--format", "safetensors", "--strategy", "tiled",
           "--tile-size", TILES[model], "--threads", "1", "--raw", "--nproc", nproc)
    for name, z in zs.items():
        got = load_file(tmp_path / "out" / f"{name}.safetensors")["sample"]
        b, _, f, h, w = z.shape
        assert got.shape == (b, 3, frames_out(f), h * scale, w * scale), name
        assert_equal(got, tiled_inputs["refs"][model][name], name)


@pytest.mark.parametrize("model", list(WAN_VARIANTS))
def test_untiled_decode_is_bit_identical_to_diffusers(
    wan_models: dict[str, Path], tmp_path: Path, model: str
) -> None:
    """--strategy none: post_quant_conv on the whole latent, then frame by frame (tiling off)."""
    cases = {k: CASES[k] for k in ("f1", "f2_batch2", "f3")}
    zs = make_inputs(tmp_path / "in", cases, seed=1)
    decode(*(tmp_path / "in" / f"{n}.safetensors" for n in zs), "--model", wan_models[model],
           "--out", tmp_path / "out", "--format", "safetensors", "--strategy", "none",
           "--threads", "1", "--raw")
    for name, z in zs.items():
        got = load_file(tmp_path / "out" / f"{name}.safetensors")["sample"]
        assert_equal(got, reference_wan_decode(wan_models[model], z, tile=None), name)


def test_default_unscaling_matches_wan_pipeline(wan_models: dict[str, Path], tmp_path: Path) -> None:
    """Without --raw: per channel z / (1 / latents_std) + latents_mean, as the Wan pipelines do."""
    z = torch.randn(1, 4, 2, 7, 5, generator=torch.Generator().manual_seed(2))
    src = save_latents(tmp_path / "z.safetensors", z)
    decode(src, "--model", wan_models["wan22"], "--out", tmp_path / "o.safetensors",
           "--strategy", "tiled", "--tile-size", TILES["wan22"], "--threads", "1")
    mean = torch.tensor(WAN_MEAN).view(1, 4, 1, 1, 1)
    inv_std = 1.0 / torch.tensor(WAN_STD).view(1, 4, 1, 1, 1)
    want = reference_wan_decode(wan_models["wan22"], z / inv_std + mean, tile=TILES["wan22"])
    assert_equal(load_file(tmp_path / "o.safetensors")["sample"], want, "unscaled")
    raw = reference_wan_decode(wan_models["wan22"], z, tile=TILES["wan22"])
    assert not torch.equal(want, raw)  # the factors matter for this input


# -- MP4 and PNG frames ------------------------------------------------------------------------

# Luma error bound of the MP4 check, in uint8 levels. Measured with these tiny random models
# (noise-like content, the hardest case for H.264) at the default --quality 8 (CRF 10), 6 seeds x
# 2 items x 9 frames per model: mean |dY| per frame 1.23-1.55 (about 1.3 of it is the RGB ->
# limited-range YUV -> RGB round trip: quality 10, CRF 0, gives 1.25-1.36), max |dY| 8, per-frame
# luma PSNR >= 42.6 dB; against any other frame of the clip the mean |dY| is >= 11. Chroma is
# compared after 2x2 averaging (yuv420p keeps one chroma sample per 2x2 block): PSNR >= 42.8 dB.
# Per-pixel RGB is not compared: on noise-like colour the 4:2:0 subsampling alone costs 7 (Wan 2.1)
# to 29 (Wan 2.2) levels of mean error.
LUMA_MAE = 3.0
PSNR_DB = 38.0
YCC = np.array([[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]])


def uint8_frames(sample: torch.Tensor) -> np.ndarray:
    """(B, 3, F, H, W) in [-1, 1] -> (B, F, H, W, 3) float levels, diffusers' postprocess rounded."""
    x = (sample / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 4, 1).numpy()
    return (x * 255).round()


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(255**2 / max(((a - b) ** 2).mean(), 1e-12)))


def pool2(c: np.ndarray) -> np.ndarray:
    """2x2 block means of (F, H, W)."""
    return F.avg_pool2d(torch.from_numpy(c)[:, None], 2)[:, 0].numpy()


def read_mp4(path: Path) -> tuple[np.ndarray, dict]:
    reader = imageio.get_reader(path, format="FFMPEG")
    try:
        return np.stack([f for f in reader]).astype(np.float64), reader.get_meta_data()
    finally:
        reader.close()


@pytest.mark.parametrize("model", list(WAN_VARIANTS))
def test_mp4_output_matches_decode_up_to_codec_loss(
    wan_models: dict[str, Path], tmp_path: Path, model: str
) -> None:
    b, f, h, w, scale = 2, 3, 5, 7, WAN_VARIANTS[model]
    z = torch.randn(b, 4, f, h, w, generator=torch.Generator().manual_seed(3))
    src = save_latents(tmp_path / "z.safetensors", z)
    (tmp_path / "out").mkdir()
    decode(src, "--model", wan_models[model], "--out", tmp_path / "out" / "clip.mp4", "--fps", "8",
           "--strategy", "tiled", "--tile-size", TILES[model], "--threads", "1", "--raw")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["clip_0.mp4", "clip_1.mp4"]
    want = uint8_frames(reference_wan_decode(wan_models[model], z, tile=TILES[model]))
    for k in range(b):
        got, meta = read_mp4(tmp_path / "out" / f"clip_{k}.mp4")
        assert got.shape == (frames_out(f), h * scale, w * scale, 3)
        assert meta["fps"] == 8 and meta["codec"] == "h264", meta
        assert meta["size"] == (w * scale, h * scale), meta
        yg, yw = got @ YCC.T, want[k] @ YCC.T
        for t in range(got.shape[0]):
            mae = np.abs(yg[t, ..., 0] - yw[t, ..., 0]).mean()
            assert mae < LUMA_MAE, f"clip_{k} frame {t}: luma mean abs error {mae:.2f}"
            assert psnr(yg[t, ..., 0], yw[t, ..., 0]) > PSNR_DB, f"clip_{k} frame {t}"
            # the bound separates: any other frame of the reference is far off
            others = [np.abs(yg[t, ..., 0] - yw[u, ..., 0]).mean() for u in range(got.shape[0]) if u != t]
            assert min(others) > 2 * LUMA_MAE, f"clip_{k} frame {t}: frames are too alike to check"
        for c in (1, 2):
            assert psnr(pool2(yg[..., c]), pool2(yw[..., c])) > PSNR_DB, f"clip_{k} chroma {c}"


def test_mp4_writer_reports_ffmpeg_failures(tmp_path: Path) -> None:
    """ffmpeg's exit status is checked (imageio-ffmpeg ignores it and leaves an empty file)."""
    video = torch.zeros(1, 3, 40, 63, 64)  # odd height: libx264 with yuv420p refuses it
    with pytest.raises(VaeparError, match=r"v.mp4: ffmpeg could not write the video \(height not divisible by 2"):
        outputs.write_sample(tmp_path / "v.mp4", video)
    for quality, fps, message in ((11, 16, "quality must be between 0 and 10, got 11"),
                                  (-1, 16, "quality must be between 0 and 10, got -1"),
                                  (8, 0, "frame rate must be positive, got 0")):
        with pytest.raises(VaeparError, match=message):
            outputs.write_sample(tmp_path / "v.mp4", torch.zeros(1, 3, 2, 8, 8), fps=fps, quality=quality)
    assert list(tmp_path.iterdir()) == []
    # the whole documented range works, 0 included (imageio-ffmpeg rejects 0)
    for quality in (0, 10):
        (path,) = outputs.write_sample(tmp_path / f"q{quality}.mp4", torch.zeros(1, 3, 2, 8, 8), quality=quality)
        assert read_mp4(path)[0].shape == (2, 8, 8, 3)
    assert [outputs.mp4_crf(q) for q in (0, 5, 8, 10)] == [51, 25, 10, 0]


def test_png_frames_one_file_per_frame(wan_models: dict[str, Path], tmp_path: Path) -> None:
    """``name_00000.png``... for one item; ``name_<b>_00000.png``... for a batch."""
    zs = make_inputs(tmp_path / "in", {"single": (1, 2, 5, 7), "pair": (2, 2, 3, 4)}, seed=4)
    decode(*(tmp_path / "in" / f"{n}.safetensors" for n in zs), "--model", wan_models["wan21"],
           "--out", tmp_path / "out", "--format", "png", "--strategy", "tiled", "--tile-size", "32",
           "--threads", "1", "--raw")
    expected = {f"single_{t:05d}.png" for t in range(5)}
    expected |= {f"pair_{k}_{t:05d}.png" for k in range(2) for t in range(5)}
    assert {p.name for p in (tmp_path / "out").iterdir()} == expected
    for name, stem in (("single", "single_{t:05d}.png"), ("pair", "pair_{k}_{t:05d}.png")):
        want = uint8_frames(reference_wan_decode(wan_models["wan21"], zs[name], tile=32))
        for k in range(want.shape[0]):
            for t in range(want.shape[1]):
                img = Image.open(tmp_path / "out" / stem.format(k=k, t=t))
                assert img.mode == "RGB"
                got = np.asarray(img).astype(np.float64)
                assert got.shape == want[k, t].shape
                assert np.abs(got - want[k, t]).max() <= 1, f"{name} item {k} frame {t}"


# -- scheduling and progress -------------------------------------------------------------------

@pytest.mark.parametrize("model", list(WAN_VARIANTS))
def test_frames_do_not_change_the_schedule(wan_models: dict[str, Path], model: str) -> None:
    """A tile's work is its area times the frame count: a constant factor per job, which leaves
    the owner assignment (and so the balance) exactly as with areas alone."""
    spec = resolve(str(wan_models[model]))
    for h, w in [(7, 9), (8, 4), (4, 6), (13, 11), (20, 3)]:
        grid = spec.family.decode_grid(spec, h, w, TILES[model], 0.25)
        assert grid.count > 1
        area = grid.weights()
        for nranks in (1, 2, 3, 4):
            owners = plan.assign(area, nranks)
            for frames in (2, 3, 5, 21):
                scaled = tuple(a * frames for a in area)
                assert plan.assign(scaled, nranks) == owners, (h, w, nranks, frames)
                loads = plan.loads(area, owners, nranks)
                assert plan.loads(scaled, owners, nranks) == [frames * x for x in loads]


def test_progress_counts_tile_frames(
    wan_models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rank 0's bar has tiles x frames steps and every decoded tile-frame ticks once."""
    seen: list[dict] = []

    class Recorder:
        def __init__(self, comm: object, key: str, total: int, label: str, show: bool) -> None:
            self.record = {"total": total, "ticks": 0}
            seen.append(self.record)

        def tick(self, n: int = 1) -> None:
            self.record["ticks"] += n

        def close(self) -> None:
            pass

    monkeypatch.setattr(worker, "Ticker", Recorder)
    zs = make_inputs(tmp_path / "in", {"f3": (1, 3, 8, 4), "f2": (1, 2, 3, 4)}, seed=5)
    decode(*(tmp_path / "in" / f"{n}.safetensors" for n in zs), "--model", wan_models["wan21"],
           "--out", tmp_path / "out", "--format", "safetensors", "--strategy", "tiled",
           "--tile-size", "32", "--threads", "1", "--raw")
    # f3: 3x2 tiles x 3 frames; f2: fits one tile (untiled) x 2 frames
    assert seen == [{"total": 18, "ticks": 18}, {"total": 2, "ticks": 2}]


# -- bad input ---------------------------------------------------------------------------------

@pytest.fixture
def no_launch(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object) -> None:
        raise AssertionError("workers were launched for bad input")

    monkeypatch.setattr(launch, "run", refuse)


BAD = {
    # name: (latent shape, model, extra args, message fragments)
    "video-to-image-vae": ((1, 4, 2, 8, 8), "kl4", [],
                           ["z.safetensors: video latents (B, C, F, H, W) (1, 4, 2, 8, 8)",
                            "given to the image VAE AutoencoderKL"]),
    "image-to-video-vae": ((1, 4, 8, 8), "wan21", [],
                           ["z.safetensors: image latents (B, C, H, W) (1, 4, 8, 8)",
                            "given to the video VAE AutoencoderKLWan", "expected (B, C, F, H, W)"]),
    "zero-frames": ((1, 4, 0, 5, 5), "wan22", [], ["z.safetensors: video latents have zero frames"]),
    "six-dims": ((1, 4, 2, 5, 5, 1), "wan21", [], ["expected video latents (B, C, F, H, W)"]),
    "channels": ((1, 16, 2, 5, 5), "wan22", [], ["latents have 16 channels", "expects 4"]),
    "tile-not-multiple": ((1, 4, 2, 9, 9), "wan22", ["--tile-size", "40"],
                          ["must be a positive multiple of the model's scale (16)"]),
    # 32 px at 16x: a 2-latent tile keeps 12 patchified pixels but steps 1 latent (8 of them)
    "tile-out-of-step": ((1, 4, 2, 9, 9), "wan22", ["--tile-size", "32", "--strategy", "tiled"],
                         ["tile cores out of step"]),
    "gif": ((1, 4, 2, 5, 5), "wan21", ["--out-name", "v.gif"], ["unsupported output format '.gif'"]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_video_input_fails_with_one_line(
    case: str, wan_models: dict[str, Path], kl_models: dict[str, Path], tmp_path: Path, no_launch: None
) -> None:
    shape, model, extra, fragments = BAD[case]
    src = save_latents(tmp_path / "z.safetensors", torch.randn(shape))
    models = {**wan_models, **kl_models}
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    name = "v.mp4"
    if extra[:1] == ["--out-name"]:
        name, extra = extra[1], extra[2:]
    result = CliRunner().invoke(cli.app, ["decode", str(src), "--model", str(models[model]), "--device",
                                          "cpu", "--out", str(out_dir / name), *extra])
    assert result.exit_code != 0, result.output
    assert "Traceback" not in result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    assert list(out_dir.iterdir()) == []
