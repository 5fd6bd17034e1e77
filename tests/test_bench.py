"""`vaepar bench`: the JSON schema from a tiny real run, and the plan on known geometries."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from vaepar import bench, worker
from vaepar.cli import app
from vaepar.shard import HaloConv2d
from vaepar.vae import resolve

RUN_KEYS = {"strategy", "nproc", "seconds", "peak_mem_bytes", "speedup", "efficiency", "max_abs_err", "work"}


def test_tiny_bench_end_to_end(kl_models: dict[str, Path], tmp_path: Path) -> None:
    result = CliRunner().invoke(app, [
        "bench", "--model", str(kl_models["kl4"]), "--resolution", "96x64", "--nproc", "1,2",
        "--strategies", "none,tiled,shard,patch", "--tile-size", "32", "--halo", "2", "--repeats", "2",
        "--warmup", "0", "--device", "cpu", "--json", str(tmp_path / "b.json")])
    assert result.exit_code == 0, result.output
    doc = json.loads((tmp_path / "b.json").read_text())
    assert doc["device"].startswith("cpu") and doc["model"] == str(kl_models["kl4"])
    assert doc["latent_shape"] == [1, 4, 24, 16]
    runs = {(r["strategy"], r["nproc"]): r for r in doc["runs"]}
    assert set(runs) == {(s, n) for s in ("none", "tiled", "shard", "patch") for n in (1, 2)}
    for (strategy, n), r in runs.items():
        assert RUN_KEYS <= set(r), r
        assert r["seconds"] > 0 and r["peak_mem_bytes"] > 0 and len(r["times"]) == 2
        assert r["efficiency"] == pytest.approx(r["speedup"] / n)
    assert runs["shard", 1]["speedup"] == 1.0
    assert runs["none", 1]["max_abs_err"] == 0.0
    assert runs["shard", 2]["max_abs_err"] <= 1e-4 * 3  # |untiled| < 3 for this model
    assert runs["tiled", 1]["max_abs_err"] > 1e-3, "tiling changes the picture (measured, not zero)"
    assert runs["tiled", 2]["max_abs_err"] == runs["tiled", 1]["max_abs_err"]  # same tiles, same merge
    assert runs["tiled", 1]["work"] > 1 and runs["shard", 2]["work"] == 1.0
    assert runs["patch", 2]["work"] == pytest.approx((14 + 14) / 24)  # bands 0:12 and 12:24, 2 rows of margin
    assert "shard" in result.output and "speedup" in result.output


def plan_for(model: Path, shape: tuple[int, ...], strategies: tuple[str, ...], counts: tuple[int, ...],
             **cfg: object) -> dict[tuple[str, int], dict[str, float]]:
    spec = resolve(str(model))
    b = bench.BenchConfig(cfg=worker.WorkerConfig(model=spec, **cfg), task="decode", shape=shape,
                          counts=counts, strategies=strategies)
    return {(r["strategy"], r["nproc"]): r for r in bench.plan_rows(b)}


def test_plan_on_known_geometries(kl_models: dict[str, Path]) -> None:
    rows = plan_for(kl_models["kl4"], (1, 4, 8, 8), ("none", "tiled", "shard", "patch"), (1, 2, 3, 64),
                    tile_size=16, halo=1)
    # tiles of 4 latents, stride 3: starts 0, 3, 6 -> sizes 4, 4, 2 per axis; 9 tiles
    weights = [a * b for a in (4, 4, 2) for b in (4, 4, 2)]
    assert rows["tiled", 1]["work"] == pytest.approx(sum(weights) / 64)
    # scan-order weights 16 16 8 | 16 16 8 | 8 8 4 (total 100): best contiguous split 56 | 44, levelled
    # by moving one 8-tile to 48 | 52 (all weights are multiples of 4: 50 | 50 cannot be had)
    assert rows["tiled", 2]["imbalance"] == pytest.approx(52 / 50)
    assert rows["none", 3]["imbalance"] == 3.0 and rows["none", 1]["bytes_sent_per_rank"] == 0
    # shard: 8 rows over 3 ranks -> 3, 3, 2; over 64 ranks only 8 get a band
    assert rows["shard", 3]["imbalance"] == pytest.approx(3 / (8 / 3))
    assert rows["shard", 64]["imbalance"] == pytest.approx(1 / (8 / 64))
    halo_convs = sum(isinstance(m, HaloConv2d) for m in _decoder_modules(kl_models["kl4"]))
    assert rows["shard", 2]["exchanges"] == halo_convs and rows["shard", 1]["exchanges"] == 0
    assert rows["shard", 3]["bytes_sent_per_rank"] > rows["shard", 2]["bytes_sent_per_rank"] > 0
    assert rows["shard", 2]["activation_bytes_per_rank"] < rows["none", 1]["activation_bytes_per_rank"]
    # every halo of this decoder is exchanged while its band's convolution runs
    assert 0 < rows["shard", 2]["bytes_overlapped_per_rank"] <= rows["shard", 2]["bytes_sent_per_rank"]
    assert rows["none", 1]["bytes_overlapped_per_rank"] == rows["tiled", 2]["bytes_overlapped_per_rank"] == 0
    # attention split by queries: each of 2 ranks scores half the queries against all keys
    whole = rows["none", 1]["attention_flops_per_rank"]
    assert whole > 0 and rows["shard", 2]["attention_flops_per_rank"] == pytest.approx(whole / 2, rel=0.02)
    # patch: bands 0:4 and 4:8 with one row of margin -> 5 rows each
    assert rows["patch", 2]["work"] == pytest.approx(10 / 8)


def _decoder_modules(model: Path) -> list[object]:
    from diffusers import AutoencoderKL

    from vaepar import shard

    vae = AutoencoderKL.from_pretrained(model)
    shard.install(vae)
    return list(vae.decoder.modules())
