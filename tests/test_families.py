"""Qwen-Image (``AutoencoderKLQwenImage``), HunyuanVideo 1.5 (``AutoencoderKLHunyuanVideo15``) and
LTX-2 (``AutoencoderKLLTX2Video``) through the CLI on one worker: untiled and tiled decode and encode equal to diffusers with
``torch.equal``, the pipelines' latent layouts and scaling, and round trips to PNG and MP4.
Tiled on 2 and 3 workers and shard on 2-4 workers run in test_shard's launches."""

from __future__ import annotations

from pathlib import Path

import imageio.v2 as imageio
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from conftest import NEEDS_LTX2, WAN_MEAN, WAN_STD, reference, save_latents, single_thread, vae_class, with_ltx2
from vaepar.cli import app

LATENTS = {"qwen": (1, 4, 7, 9), "hv15": (1, 4, 2, 7, 9), "ltx2": (1, 8, 2, 8, 9)}  # 56x72; 5 at 112x144; 9 at 256x288
PIXELS = {"qwen": (2, 3, 56, 40), "hv15": (1, 3, 5, 112, 144), "ltx2": (1, 3, 9, 224, 160)}
TILE = {"qwen": (32, None), "hv15": (64, None), "ltx2": (128, 0.25)}  # 3x3 decode tiles for all


def cli(*args: str, code: int = 0) -> str:
    result = CliRunner().invoke(app, [*args, "--device", "cpu", "--quiet", "--threads", "1"])
    assert result.exit_code == code, result.output
    return result.output


def run(task: str, model: Path, x: torch.Tensor, folder: Path, *options: str) -> torch.Tensor:
    """``vaepar decode|encode --raw`` of ``x`` on one worker; the raw result."""
    src, out = folder / f"{task}_in.safetensors", folder / f"{task}_out.safetensors"
    if task == "decode":
        save_latents(src, x)
    else:
        save_file({"sample": x}, str(src))
    cli(task, str(src), "--model", str(model), "--out", str(out), "--raw", *options)
    return load_file(out)["sample" if task == "decode" else "latents"]


@pytest.mark.parametrize("task", ["decode", "encode"])
@pytest.mark.parametrize("family", [with_ltx2(f) for f in ("qwen", "hv15", "ltx2")])
def test_one_worker_untiled_and_tiled_equal_diffusers(family_models: dict[str, Path], tmp_path: Path,
                                                       family: str, task: str) -> None:
    g = torch.Generator().manual_seed(7)
    x = torch.randn(LATENTS[family], generator=g) if task == "decode" else torch.rand(PIXELS[family], generator=g) * 2 - 1
    model, (tile, overlap) = family_models[family], TILE[family]
    untiled = run(task, model, x, tmp_path, "--strategy", "none")
    assert torch.equal(untiled, reference(model, task, x))
    tiling = ["--tile-size", str(tile)] + (["--tile-overlap", str(overlap)] if overlap else [])
    tiled = run(task, model, x, tmp_path, "--strategy", "tiled", *tiling)
    want = reference(model, task, x, tile=tile, overlap=overlap or 0.25)
    assert torch.equal(tiled, want)
    assert not torch.equal(want, untiled)  # the grid really tiled


def test_qwen_pipeline_tokens_and_frame_axis(family_models: dict[str, Path], tmp_path: Path) -> None:
    """QwenImagePipeline's packed tokens (B, (H/16)(W/16), 4C) with height/width decode as the
    pipeline does (unpack, z / (1 / std) + mean, decode, frame 0), clamped as diffusers' untiled decode;
    a (B, C, 1, H, W) latent file decodes like (B, C, H, W)."""
    model = family_models["qwen"]
    tokens = torch.randn(2, 3 * 4, 16, generator=torch.Generator().manual_seed(8)) * 3  # 48x64 pixels
    src = save_latents(tmp_path / "t.safetensors", tokens, height="48", width="64")
    cli("decode", str(src), "--model", str(model), "--out", str(tmp_path / "o.safetensors"), "--strategy", "none")
    z = tokens.view(2, 3, 4, 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(2, 4, 1, 6, 8)
    mean, inv_std = torch.tensor(WAN_MEAN).view(1, 4, 1, 1, 1), 1.0 / torch.tensor(WAN_STD).view(1, 4, 1, 1, 1)
    vae = vae_class(model).from_pretrained(model).eval()
    with single_thread(), torch.no_grad():
        want = vae.decode(z / inv_std + mean).sample[:, :, 0]
    got = load_file(tmp_path / "o.safetensors")["sample"]
    assert torch.equal(got, want) and got.abs().max() <= 1
    five = save_latents(tmp_path / "f.safetensors", z[:1].clone(), scaled="false")
    four = save_latents(tmp_path / "g.safetensors", z[:1, :, 0].clone(), scaled="false")
    outs = []
    for i, path in enumerate((five, four)):
        cli("decode", str(path), "--model", str(model), "--out", str(tmp_path / f"{i}.safetensors"))
        outs.append(load_file(tmp_path / f"{i}.safetensors")["sample"])
    assert outs[0].shape == (1, 3, 48, 64) and torch.equal(outs[0], outs[1])


def test_qwen_png_round_trip(family_models: dict[str, Path], tmp_path: Path) -> None:
    rgb = (np.random.default_rng(0).random((40, 56, 3)) * 255).astype(np.uint8)
    Image.fromarray(rgb).save(tmp_path / "in.png")
    cli("encode", str(tmp_path / "in.png"), "--model", str(family_models["qwen"]), "--out", str(tmp_path / "z.safetensors"))
    assert load_file(tmp_path / "z.safetensors")["latents"].shape == (1, 4, 5, 7)
    cli("decode", str(tmp_path / "z.safetensors"), "--out", str(tmp_path / "out.png"))
    assert Image.open(tmp_path / "out.png").size == (56, 40)


def test_hv15_scaling_and_mp4_round_trip(family_models: dict[str, Path], tmp_path: Path) -> None:
    """Pipelines divide latents by scaling_factor (0.7 here) before decode; MP4 in, MP4 out."""
    model = family_models["hv15"]
    z = torch.randn(1, 4, 2, 3, 4, generator=torch.Generator().manual_seed(9))
    cli("decode", str(save_latents(tmp_path / "z.safetensors", z)), "--model", str(model),
        "--out", str(tmp_path / "o.safetensors"), "--strategy", "none")
    assert torch.equal(load_file(tmp_path / "o.safetensors")["sample"], reference(model, "decode", z / 0.7))
    frames = (np.random.default_rng(1).random((5, 48, 64, 3)) * 255).astype(np.uint8)
    imageio.mimwrite(tmp_path / "in.mp4", list(frames), fps=8, macro_block_size=1)
    cli("encode", str(tmp_path / "in.mp4"), "--model", str(model), "--out", str(tmp_path / "e.safetensors"))
    assert load_file(tmp_path / "e.safetensors")["latents"].shape == (1, 4, 2, 3, 4)
    cli("decode", str(tmp_path / "e.safetensors"), "--out", str(tmp_path / "out.mp4"))
    with imageio.get_reader(tmp_path / "out.mp4") as reader:
        decoded = [frame for frame in reader]
    assert len(decoded) == 5 and decoded[0].shape == (48, 64, 3)


def test_image_to_hv15_is_one_line(family_models: dict[str, Path], tmp_path: Path) -> None:
    src = save_latents(tmp_path / "z.safetensors", torch.randn(1, 4, 3, 4))
    out = cli("decode", str(src), "--model", str(family_models["hv15"]), "--out", str(tmp_path / "o.mp4"), code=1)
    assert "image latents" in out and "Traceback" not in out and not (tmp_path / "o.mp4").exists()


@NEEDS_LTX2
def test_ltx2_refuses_what_reflection_cannot_pad(family_models: dict[str, Path], tmp_path: Path) -> None:
    """1 latent row (diffusers fails there too), or a tile grid whose last tile has 1 row: one line."""
    model = family_models["ltx2"]
    one_row = save_latents(tmp_path / "z.safetensors", torch.randn(1, 8, 2, 1, 4))
    out = cli("decode", str(one_row), "--model", str(model), "--out", str(tmp_path / "o.mp4"), code=1)
    assert "at least 2 latent rows" in out and "Traceback" not in out and not (tmp_path / "o.mp4").exists()
    seven = save_latents(tmp_path / "s.safetensors", torch.randn(1, 8, 1, 7, 4))
    out = cli("decode", str(seven), "--model", str(model), "--out", str(tmp_path / "o.mp4"), "--strategy", "tiled",
              "--tile-size", "128", "--tile-overlap", "0.25", code=1)
    assert "--tile-size 128" in out and "Traceback" not in out


@NEEDS_LTX2
def test_ltx2_latents_decode_as_the_pipeline_hands_them_over(family_models: dict[str, Path], tmp_path: Path) -> None:
    """LTX2Pipeline's output_type="latent" returns denormalised latents: vaepar decodes them as they are,
    and encode -> decode round-trips an MP4 of 1 + 8k frames."""
    model = family_models["ltx2"]
    z = torch.randn(1, 8, 2, 2, 3, generator=torch.Generator().manual_seed(10))
    cli("decode", str(save_latents(tmp_path / "z.safetensors", z)), "--model", str(model),
        "--out", str(tmp_path / "o.safetensors"), "--strategy", "none")
    assert torch.equal(load_file(tmp_path / "o.safetensors")["sample"], reference(model, "decode", z))
    frames = (np.random.default_rng(2).random((9, 64, 96, 3)) * 255).astype(np.uint8)
    imageio.mimwrite(tmp_path / "in.mp4", list(frames), fps=8, macro_block_size=1)
    cli("encode", str(tmp_path / "in.mp4"), "--model", str(model), "--out", str(tmp_path / "e.safetensors"))
    assert load_file(tmp_path / "e.safetensors")["latents"].shape == (1, 8, 2, 2, 3)
    cli("decode", str(tmp_path / "e.safetensors"), "--out", str(tmp_path / "out.mp4"))
    with imageio.get_reader(tmp_path / "out.mp4") as reader:
        decoded = [frame for frame in reader]
    assert len(decoded) == 9 and decoded[0].shape == (64, 96, 3)


@NEEDS_LTX2
def test_ltx2_noise_injection_is_refused_for_shard(tmp_path: Path) -> None:
    """A decoder that injects noise draws it per call and per band size: shard says so and stops."""
    from diffusers import AutoencoderKLLTX2Video

    torch.manual_seed(6)
    AutoencoderKLLTX2Video(latent_channels=8, block_out_channels=(8, 16, 32, 32), decoder_block_out_channels=(8, 16, 32),
                           layers_per_block=(1, 1, 1, 1, 1), decoder_layers_per_block=(1, 1, 1, 1),
                           decoder_inject_noise=(True, False, False, False), spatial_compression_ratio=32,
                           temporal_compression_ratio=8).save_pretrained(tmp_path / "noisy")
    src = save_latents(tmp_path / "z.safetensors", torch.randn(1, 8, 1, 3, 3))
    out = cli("decode", str(src), "--model", str(tmp_path / "noisy"), "--out", str(tmp_path / "o.mp4"),
              "--strategy", "shard", code=1)
    assert "decoder_inject_noise" in out and "use --strategy tiled or patch" in out and "Traceback" not in out
    assert not (tmp_path / "o.mp4").exists() and len(out.strip().splitlines()) == 1


# kl4: encoder 3 down resnets + 2 mid + conv_act, decoder 3x2 up resnets + 2 mid + conv_act
@pytest.mark.parametrize("name, owners", [("kl4", 3 + 2 + 1 + 6 + 2 + 1), ("wan21", None), ("qwen", None)])
def test_activations_run_in_place_only_inside_and_only_without_autograd(
        kl_models: dict[str, Path], wan_models: dict[str, Path], family_models: dict[str, Path],
        name: str, owners: int | None) -> None:
    """The switched activations are real SiLU modules of the loaded model; they write in place only
    inside the context and only under inference; a decode with them equals one without, bit for bit."""
    from vaepar.vae import load, resolve

    path = {**kl_models, **wan_models, **family_models}[name]
    spec = resolve(str(path))
    vae = load(spec, torch.device("cpu"), torch.float32)
    family = spec.family(vae, spec)
    acts = family.fresh_activations()
    assert acts and all(isinstance(m, torch.nn.SiLU) for m in acts)
    assert owners is None or len(acts) == owners
    with family.activations_in_place():  # autograd on: nothing switched
        assert not any(m.inplace for m in acts)
    z = torch.randn(1, *((spec.latent_channels, 1) if spec.family.video else (spec.latent_channels,)), 6, 5,
                    generator=torch.Generator().manual_seed(3))
    with torch.inference_mode(), single_thread():
        plain = family.decode_tile(z, tiled=False)
        with family.activations_in_place():
            assert all(m.inplace for m in acts)
            fast = family.decode_tile(z, tiled=False)
    assert not any(m.inplace for m in acts)
    assert torch.equal(fast, plain)


@pytest.mark.parametrize("name", ["kl4", "wan21", "qwen", "hv15", with_ltx2("ltx2")])
def test_heap_is_trimmed_before_the_last_upsampler_only_inside(
        kl_models: dict[str, Path], wan_models: dict[str, Path], family_models: dict[str, Path],
        monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """Inside ``heap_trimmed`` a decode trims the heap once per call of the decoder's last upsampler
    (on CPU), with the same result bit for bit; outside, never."""
    from vaepar import heap
    from vaepar.vae import load, resolve

    spec = resolve(str({**kl_models, **wan_models, **family_models}[name]))
    vae = load(spec, torch.device("cpu"), torch.float32)
    family = spec.family(vae, spec)
    ups = [m for m in vae.decoder.modules() if isinstance(m, family.upsampler_types())]
    assert ups, "the family names no upsampler its decoder has"
    z = torch.randn(1, *((spec.latent_channels, 2) if spec.family.video else (spec.latent_channels,)), 6, 5,
                    generator=torch.Generator().manual_seed(3))
    calls: list[str] = []
    ups[-1].register_forward_pre_hook(lambda m, a: calls.append("last upsampler"))
    with torch.inference_mode(), single_thread():
        plain = family.decode_tile(z, tiled=False)
        with family.heap_trimmed():
            assert torch.equal(family.decode_tile(z, tiled=False), plain)
        monkeypatch.setattr(heap, "trim", lambda: calls.append("trim"))
        calls.clear()
        with family.heap_trimmed():
            family.decode_tile(z, tiled=False)
        assert calls and calls == ["last upsampler", "trim"] * (len(calls) // 2)
        calls.clear()
        family.decode_tile(z, tiled=False)
    assert calls and "trim" not in calls
