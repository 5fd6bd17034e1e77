"""The library API: ``vaepar.parallelize(vae)`` inside a job the caller launched.

Workers start under torch's ``elastic_launch`` (gloo, one intra-op thread each), initialise the
default process group themselves as a user's torchrun script does, load the tiny random
AutoencoderKL, Wan 2.1 / 2.2, Qwen-Image, HunyuanVideo 1.5 and LTX-2 VAEs, parallelize them and return what ``vae.decode`` and
``vae.encode`` gave on every rank. The test process compares each rank's result with diffusers'
own single-process result: ``shard`` within 1e-4 * max(1, max|ref|) of untiled, ``tiled``
(after ``vae.enable_tiling()``) equal with ``torch.equal`` to diffusers' serial tiled result,
and, after ``unparallelize``, equal to the untouched model. One launch per worker count serves
every check (starting workers dominates the time); the 2-worker launch also runs a tiny DiT
pipeline with ``parallelize(pipe.vae)``.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

import vaepar
from conftest import HAS_LTX2, enable_tiling, make_hv15, make_kl, make_ltx2, make_qwen, make_wan, single_thread, vae_class

# name: (latent shape, pixel shape) as the class's pipelines pass them; 7 latent rows (uneven on 2 and
# 3 ranks), batch 2 for KL and Qwen-Image (with its frame axis of 1), several latent frames for video.
SHAPES = {
    "kl4": ((2, 4, 7, 9), (2, 3, 28, 36)),
    "wan21": ((1, 4, 3, 7, 9), (1, 3, 5, 56, 72)),
    "wan22": ((1, 4, 3, 7, 9), (1, 3, 5, 112, 144)),
    "qwen": ((2, 4, 1, 7, 9), (2, 3, 1, 56, 72)),
    "hv15": ((1, 4, 2, 7, 9), (1, 3, 5, 112, 144)),
    "ltx2": ((1, 8, 2, 7, 9), (1, 3, 9, 224, 288)),
}
TILES = {"kl4": (16, 0.25), "wan21": (32, 0.25), "wan22": (64, 0.25), "qwen": (32, 0.25), "hv15": (64, 0.25),
         "ltx2": (256, 0.375)}  # sample tile, overlap


def load(name: str, path: str) -> torch.nn.Module:
    return vae_class(Path(path)).from_pretrained(path).eval()


def enable_small_tiling(vae: torch.nn.Module, name: str) -> None:
    enable_tiling(vae, *TILES[name])


def inputs() -> dict[str, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return {name: {"z": torch.randn(z, generator=g), "x": torch.rand(x, generator=g) * 2 - 1}
            for name, (z, x) in SHAPES.items()}


def checks(paths: dict[str, str], data: dict[str, dict[str, torch.Tensor]], dit: str | None) -> dict[str, Any]:
    """Every rank: what the parallelized VAEs (and the DiT pipeline) return."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    got: dict[str, Any] = {}
    try:
        for name, path in paths.items():
            z, x = data[name]["z"], data[name]["x"]
            vae = vaepar.parallelize(load(name, path), strategy="shard")
            with torch.no_grad():
                got[f"{name} shard decode"] = vae.decode(z).sample
                got[f"{name} shard decode tuple"] = vae.decode(z, return_dict=False)[0]
            with torch.inference_mode():
                got[f"{name} shard encode"] = vae.encode(x).latent_dist.mode()
            vaepar.parallelize(vae)  # auto: tiled, since tiling is on
            enable_small_tiling(vae, name)
            with torch.no_grad():
                got[f"{name} tiled decode"] = vae.decode(z).sample
                posterior = vae.encode(x).latent_dist
                got[f"{name} tiled encode"] = posterior.mode()
                got[f"{name} tiled sample"] = posterior.sample(torch.Generator().manual_seed(5))
            vae.disable_tiling()
            vaepar.parallelize(vae, tile_size=TILES[name][0], tile_overlap=TILES[name][1])  # tiling off: tiled too
            with torch.no_grad():
                got[f"{name} tile_size decode"] = vae.decode(z).sample
            vaepar.unparallelize(vae)
            with torch.no_grad():
                got[f"{name} restored decode"] = vae.decode(z).sample
            got[f"{name} restored keys"] = sorted(vae.state_dict())
        if dit is not None:
            got["dit"] = run_dit(dit, parallel=True)
        vae = vaepar.parallelize(load("kl4", paths["kl4"]))
        try:  # a rank-dependent input: refused on every rank, never a hang
            with torch.no_grad():
                vae.decode(torch.randn(1, 4, 7 + dist.get_rank(), 9))
        except ValueError as exc:
            got["mismatch"] = str(exc)
    finally:
        dist.destroy_process_group()
    return got


def run_dit(path: str, *, parallel: bool) -> torch.Tensor:
    from diffusers import DiTPipeline

    pipe = DiTPipeline.from_pretrained(path)
    if parallel:
        vaepar.parallelize(pipe.vae)
    images = pipe(class_labels=[1, 0], generator=torch.Generator().manual_seed(0), num_inference_steps=2,
                  output_type="np").images
    return torch.from_numpy(images)


def reference(name: str, path: str, data: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers alone, single-threaded: untiled, then serial tiled."""
    vae = load(name, path)
    z, x = data["z"], data["x"]
    with single_thread(), torch.no_grad():
        ref = {"decode": vae.decode(z).sample, "encode": vae.encode(x).latent_dist.mode()}
        enable_small_tiling(vae, name)
        ref["tiled decode"] = vae.decode(z).sample
        posterior = vae.encode(x).latent_dist
        ref["tiled encode"] = posterior.mode()
        ref["tiled sample"] = posterior.sample(torch.Generator().manual_seed(5))
    ref["keys"] = sorted(load(name, path).state_dict())
    return ref


def make_dit(path: Path, vae_dir: Path) -> Path:
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    torch.manual_seed(0)
    transformer = DiTTransformer2DModel(
        sample_size=8, num_layers=1, patch_size=2, attention_head_dim=8, num_attention_heads=2, in_channels=4,
        out_channels=8, activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_zero",
        norm_elementwise_affine=False)
    pipe = DiTPipeline(transformer=transformer, vae=AutoencoderKL.from_pretrained(vae_dir),
                       scheduler=DDIMScheduler(), id2label={0: "cat", 1: "dog"})
    pipe.save_pretrained(path)
    return path


def launch(nproc: int, *args: Any) -> dict[int, dict[str, Any]]:
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, rdzv_backend="c10d",
                          rdzv_endpoint="localhost:0", run_id=uuid.uuid4().hex, max_restarts=0,
                          monitor_interval=0.1, start_method="spawn")
    return elastic_launch(config, checks)(*args)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, str], dict[str, Any], Path]:
    root = tmp_path_factory.mktemp("api")
    paths = {"kl4": str(make_kl(root / "kl4")), "wan21": str(make_wan(root / "wan21", "wan21")),
             "wan22": str(make_wan(root / "wan22", "wan22")), "qwen": str(make_qwen(root / "qwen")),
             "hv15": str(make_hv15(root / "hv15"))}
    if HAS_LTX2:  # diffusers >= 0.37
        paths["ltx2"] = str(make_ltx2(root / "ltx2"))
    return paths, inputs(), make_dit(root / "dit", Path(paths["kl4"]))


@pytest.fixture(scope="module")
def refs(setup: tuple[dict[str, str], dict[str, Any], Path]) -> dict[str, dict[str, torch.Tensor]]:
    paths, data, _ = setup
    return {name: reference(name, path, data[name]) for name, path in paths.items()}


def tolerance(want: torch.Tensor) -> float:
    return 1e-4 * max(1.0, want.abs().max().item())


@pytest.mark.parametrize("nproc", [2, 3])
def test_parallelize_on_every_rank(setup: tuple[dict[str, str], dict[str, Any], Path],
                                   refs: dict[str, dict[str, torch.Tensor]], nproc: int) -> None:
    paths, data, dit = setup
    ranks = launch(nproc, paths, data, str(dit) if nproc == 2 else None)
    assert sorted(ranks) == list(range(nproc))
    worst = 0.0
    for rank, got in ranks.items():
        for name, ref in refs.items():
            where = f"rank {rank} of {nproc}, {name}"
            for what in ("decode", "decode tuple", "encode"):
                want = ref[what.replace(" tuple", "")]
                out = got[f"{name} shard {what}"]
                assert out.shape == want.shape, where
                err = (out - want).abs().max().item()
                assert err <= tolerance(want), f"{where} shard {what}: {err:.2e}"
                worst = max(worst, err / tolerance(want) * 1e-4)
            for what in ("decode", "encode", "sample"):
                assert torch.equal(got[f"{name} tiled {what}"], ref[f"tiled {what}"]), f"{where} tiled {what}"
            assert torch.equal(got[f"{name} tile_size decode"], ref["tiled decode"]), f"{where} tile_size"
            assert torch.equal(got[f"{name} restored decode"], ref["decode"]), where
            assert got[f"{name} restored keys"] == ref["keys"], where
        assert "every rank must decode the same input" in got.get("mismatch", ""), where
    print(f"\n  {nproc} ranks: worst shard error relative to max(1, max|untiled|): {worst:.2e}")
    if nproc == 2:
        with single_thread(), torch.no_grad():
            want = run_dit(str(dit), parallel=False)
        for rank, got in ranks.items():
            assert got["dit"].shape == want.shape == (2, 32, 32, 3)
            assert (got["dit"] - want).abs().max().item() <= 1e-4, f"rank {rank}: DiT images differ"


def test_one_process_without_a_group_runs_the_vae_as_before(setup: tuple[dict[str, str], dict[str, Any], Path],
                                                            refs: dict[str, dict[str, torch.Tensor]]) -> None:
    paths, data, _ = setup
    vae = vaepar.parallelize(load("kl4", paths["kl4"]))
    with single_thread(), torch.no_grad():
        assert torch.equal(vae.decode(data["kl4"]["z"]).sample, refs["kl4"]["decode"])
    # the decode ran with in-place activations (bit-identical, above) and switched them back after
    assert not any(isinstance(m, torch.nn.SiLU) and m.inplace for m in vae.modules())
    with pytest.raises(vaepar.OptionError, match="unknown strategy 'fast'"):
        vaepar.parallelize(vae, strategy="fast")
