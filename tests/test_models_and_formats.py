"""Model resolution, packed Flux latents, metadata-named models and the JSON summary."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from conftest import reference_decode, save_latents
from vaepar import latents
from vaepar.cli import app
from vaepar.errors import VaeparError
from vaepar.vae import presets, resolve


def run(*args: str) -> str:
    result = CliRunner().invoke(app, ["decode", *args, "--device", "cpu", "--threads", "1"])
    assert result.exit_code == 0, result.output
    return result.output


def test_local_folder_with_vae_subfolder(kl_models: dict[str, Path], tmp_path: Path) -> None:
    shutil.copytree(kl_models["kl4"], tmp_path / "pipeline" / "vae")
    spec = resolve(str(tmp_path / "pipeline"))
    assert spec.subfolder == "vae" and spec.class_name == "AutoencoderKL" and spec.latent_channels == 4
    assert resolve(str(kl_models["kl4"])).subfolder == ""


def test_every_preset_names_a_repo_and_known_factors() -> None:
    table = presets()
    assert {"sd15", "sdxl", "sd3", "flux", "flux2-dev", "qwen-image", "wan2.1", "wan2.2", "hunyuanvideo-1.5",
            "ltx2"} <= set(table)
    assert table["flux"]["shift_factor"] == pytest.approx(0.1159) and table["flux"]["packed"]
    assert all("/" in entry["repo"] for entry in table.values() if "path" not in entry)


def test_unreachable_hub_is_one_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    start = time.monotonic()
    with pytest.raises(VaeparError, match=r"model 'sd15': cannot fetch 'stable-diffusion-v1-5/.*' from the hub"):
        resolve("sd15")
    assert time.monotonic() - start < 30


def pack(z: torch.Tensor) -> torch.Tensor:
    """diffusers' FluxPipeline._pack_latents."""
    b, c, h, w = z.shape
    z = z.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return z.reshape(b, (h // 2) * (w // 2), c * 4)


def test_unpack_inverts_flux_packing(kl_models: dict[str, Path]) -> None:
    spec = resolve(str(kl_models["kl16"]))
    z = torch.randn(2, 16, 10, 14)
    # scale 4 here: a 40x56 image has 2*(40//8) x 2*(56//8) = 10 x 14 latents
    assert torch.equal(latents.unpack(Path("z"), pack(z), spec, 40, 56), z)


def test_packed_latents_decode_like_unpacked(kl_models: dict[str, Path], tmp_path: Path) -> None:
    z = torch.randn(1, 16, 10, 14, generator=torch.Generator().manual_seed(3))
    src = save_latents(tmp_path / "packed.safetensors", pack(z), height="40", width="56")
    run(str(src), "--model", str(kl_models["kl16"]), "--raw", "--strategy", "none", "--out", str(tmp_path / "a.safetensors"))
    src2 = save_latents(tmp_path / "packed2.safetensors", pack(z))
    run(str(src2), "--model", str(kl_models["kl16"]), "--raw", "--strategy", "none", "--height", "40", "--width", "56",
        "--out", str(tmp_path / "b.safetensors"))
    want = reference_decode(kl_models["kl16"], z, tile=None)
    for name in ("a", "b"):
        assert torch.equal(load_file(tmp_path / f"{name}.safetensors")["sample"], want)


def test_model_named_in_file_metadata(kl_models: dict[str, Path], tmp_path: Path) -> None:
    z = torch.randn(1, 4, 6, 6, generator=torch.Generator().manual_seed(4))
    src = save_latents(tmp_path / "z.safetensors", z, model=str(kl_models["kl4"]))
    run(str(src), "--raw", "--out", str(tmp_path / "o.safetensors"))
    assert torch.equal(load_file(tmp_path / "o.safetensors")["sample"], reference_decode(kl_models["kl4"], z, tile=None))


def test_json_summary(kl_models: dict[str, Path], tmp_path: Path) -> None:
    z = torch.randn(2, 4, 19, 23, generator=torch.Generator().manual_seed(5))
    src = save_latents(tmp_path / "z.safetensors", z)
    out = run(str(src), "--model", str(kl_models["kl4"]), "--out", str(tmp_path / "img.png"),
              "--strategy", "tiled", "--tile-size", "32", "--nproc", "2", "--json", str(tmp_path / "s.json"))
    doc = json.loads((tmp_path / "s.json").read_text())
    assert doc["command"] == "decode" and doc["nproc"] == 2 and doc["device"] == "cpu"
    (job,) = doc["jobs"]
    assert job["input"] == str(src) and job["outputs"] == [str(tmp_path / "img_0.png"), str(tmp_path / "img_1.png")]
    assert job["input_shape"] == [2, 4, 19, 23] and job["output_shape"] == [2, 3, 76, 92]
    assert job["strategy"] == "tiled" and job["tiles"] == 16 and job["seconds"] > 0
    assert [r["rank"] for r in job["ranks"]] == [0, 1]
    assert sum(r["tiles"] for r in job["ranks"]) == 16 and all(r["tiles"] > 0 for r in job["ranks"])
    assert all(r["peak_mem_bytes"] > 0 for r in job["ranks"])
    assert doc["peak_mem_bytes"] == max(r["peak_mem_bytes"] for r in job["ranks"])
    assert "peak memory" in out and "img_1.png" in out
    assert not os.path.exists(tmp_path / "img.png")
