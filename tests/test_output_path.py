"""The output path of `vaepar decode`: for PNG and MP4 each rank converts its own part of the result
to uint8 before the gather, and rank 0 writes the outputs on a background thread.

* Units, no workers: :func:`outputs.pixel_bytes` and :func:`outputs.to_uint8` equal the float
  formula written before (``round(clamp(x / 2 + 0.5, 0, 1) * 255)`` in numpy) at every rounding
  boundary; every family's ``finish_values`` then ``arrange`` on uint8 equals ``finish_decode`` then
  uint8; the writer's order, bound and failures.
* One 2-worker launch (:func:`probe`): ``Worker.decode_tensor`` with and without ``pixels`` for KL
  (tiled, shard, patch) and Wan 2.2 (shard, tiled: unpatchified on rank 0 after the gather), with
  spies on the joins: the pixel result equals the float result's pixels byte for byte, and every
  rank hands the join uint8 parts, a quarter of the float32 bytes. Also ``share`` with a finish,
  and a NaN on one rank's part only: every rank stops with the same line.
* CLI on 2 workers: several inputs to PNG (tiled: byte-identical to the 1-worker float path; shard:
  to the float path on 2 workers); a write that fails after the up-front checks ends the command
  with one line, exit 1, the earlier outputs written and no temporary file left.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from typer.testing import CliRunner

from conftest import save_latents
from vaepar import engine, launch, outputs, shard, tiled, worker
from vaepar.cli import app
from vaepar.comm import Comm
from vaepar.errors import VaeparError
from vaepar.vae import resolve
from vaepar.writer import Writer

KL_TILE = 16  # pixels: 4 latents at scale 4, stride 3: a 7x9 latent makes 3x3 tiles


def old_to_uint8(x: torch.Tensor) -> np.ndarray:
    """``outputs.to_uint8`` as it was before the pixel path: floats on the CPU, numpy rounding."""
    x = (x.detach().float().cpu() / 2 + 0.5).clamp(0, 1)
    return (x.movedim(1, -1).numpy() * 255).round().astype("uint8")


# -- units -----------------------------------------------------------------------------------

def boundary_values() -> torch.Tensor:
    """float32 values at and next to every rounding boundary of the formula, and random ones."""
    k = torch.arange(-2, 258, dtype=torch.float64)
    centres = ((k + 0.5) / 255 - 0.5) * 2
    near = (centres[:, None] + torch.linspace(-2e-6, 2e-6, 201, dtype=torch.float64)).flatten().float()
    up, down = torch.nextafter(near, torch.tensor(9.0)), torch.nextafter(near, torch.tensor(-9.0))
    rand = torch.randn(30000, generator=torch.Generator().manual_seed(0)) * 1.5
    edges = torch.tensor([-1.0, 1.0, 0.0, -0.0, 3.0, -3.0, float("inf"), float("-inf")])
    v = torch.cat([near, up, down, rand, edges])
    return v[: v.numel() // 12 * 12]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_pixel_bytes_equal_the_float_formula(dtype: torch.dtype) -> None:
    v = boundary_values().to(dtype)
    for x in (v.reshape(2, 3, -1, 2), v.reshape(2, 3, 2, -1, 1)):  # image and video layouts
        want = old_to_uint8(x)
        assert np.array_equal(outputs.pixel_bytes(x).movedim(1, -1).numpy(), want)
        assert np.array_equal(outputs.to_uint8(x), want)
        assert np.array_equal(outputs.to_uint8(outputs.pixel_bytes(x)), want)
        assert outputs.to_uint8(x).flags["C_CONTIGUOUS"]


def test_finish_splits_into_values_then_arrangement(kl_models: dict[str, Path], wan_models: dict[str, Path],
                                                    family_models: dict[str, Path]) -> None:
    """finish_values (elementwise, per part) then arrange (a permutation, on uint8) gives the
    pixels of finish_decode: every family can take the uint8 gather."""
    g = torch.Generator().manual_seed(1)
    for name, path in {**kl_models, **wan_models, **family_models}.items():
        spec = resolve(str(path))
        family = spec.family(None, spec)
        channels = 12 if name == "wan22" else 3  # Wan 2.2's decoder returns 2x2-patchified pixels
        shape = (2, channels, 3, 4, 5) if spec.family.video else (2, channels, 4, 5)
        x = torch.randn(shape, generator=g) * 1.5
        got = family.arrange(outputs.pixel_bytes(family.finish_values(x)))
        assert torch.equal(got, outputs.pixel_bytes(family.finish_decode(x))), name


def test_writer_runs_in_order_and_holds_at_most_depth() -> None:
    writer, done, release = Writer(depth=2), [], threading.Event()

    def write(k: int) -> None:
        release.wait(10)
        done.append(k)

    writer.submit(lambda: write(0))
    writer.submit(lambda: write(1))
    threading.Timer(0.3, release.set).start()
    t0 = time.monotonic()
    writer.make_room()  # two pending: waits for the first
    assert time.monotonic() - t0 > 0.2 and done[:1] == [0]
    writer.submit(lambda: write(2))
    writer.flush()
    assert done == [0, 1, 2]
    writer.close()


def test_writer_raises_a_failed_write_once_and_close_finishes_the_rest(tmp_path: Path) -> None:
    writer = Writer()

    def fail() -> None:
        raise VaeparError("x.png: cannot write the output (No space left on device)")

    writer.submit(fail)
    time.sleep(0.1)
    with pytest.raises(VaeparError, match="No space left"):
        writer.make_room()
    writer.make_room()  # reported once
    writer.submit(lambda: (time.sleep(0.2), (tmp_path / "late").write_text("ok")))
    writer.close()  # waits for the write
    assert (tmp_path / "late").read_text() == "ok"


def test_a_write_error_is_one_line_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    (tmp_path / "img_0.png").mkdir()  # the batch's first file is taken by a folder
    with pytest.raises(VaeparError, match=r"img\.png: cannot write the output \(Is a directory\)"):
        outputs.write_sample(tmp_path / "img.png", torch.zeros(2, 3, 4, 4))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["img_0.png"]


# -- one 2-worker launch ----------------------------------------------------------------------

def joined_parts(spies: list[mock.MagicMock]) -> list[tuple[str, int]]:
    """(dtype, bytes) of every part this rank handed to rank 0's join."""
    seen = []
    for spy in spies:
        for call in spy.call_args_list:
            first = call.args[0]
            parts = list(first.values()) if isinstance(first, dict) else [first] if first is not None else []
            seen += [(str(p.dtype), p.numel() * p.element_size()) for p in parts]
    return seen


def probe(runs: list[tuple[str, worker.WorkerConfig, torch.Tensor]], nan: torch.Tensor) -> dict[str, Any] | None:
    """Every rank: decode each run's latents with and without ``pixels``, recording what each rank
    handed to the join; then the share path with a finish, then a NaN on rank 1's part only."""
    comm = Comm.join("cpu")
    results: dict[str, Any] = {}
    try:
        with mock.patch.object(Comm, "join", return_value=comm), \
                mock.patch.object(tiled, "_gather_cores", wraps=tiled._gather_cores) as cores, \
                mock.patch.object(shard, "_gather_bands", wraps=shard._gather_bands) as bands:
            workers = {}
            for tag, cfg, z in runs:
                workers[tag] = w = worker.Worker(cfg)
                for pixels in (False, True):
                    cores.reset_mock()
                    bands.reset_mock()
                    done = w.decode_tensor(z, tag, pixels=pixels)
                    joined = comm.gather_all(joined_parts([cores, bands]))
                    results[tag, pixels] = (done.tensor if done is not None else None, joined)
            results["share"] = shared(workers, runs, comm)
            results["nan"] = nan_everywhere(workers["kl_patch"], nan, comm)
    finally:
        comm.close()
    return results if comm.rank == 0 else None


def shared(workers: dict[str, worker.Worker], runs: list[tuple[str, worker.WorkerConfig, torch.Tensor]],
           comm: Comm) -> dict[str, list[torch.Tensor]]:
    """``engine.execute(share=True, finish=...)``: every rank's result, for KL tiled and shard."""
    out = {}
    for tag, cfg, z in runs:
        if tag in ("kl_tiled", "kl_shard"):
            w = workers[tag]
            strategy, grid = worker.plan_job(cfg, "decode", tuple(z.shape), comm.world)
            with torch.inference_mode():
                result, _ = engine.execute(w.family, "decode", strategy, z, grid, comm, groups=w.groups,
                                           share=True, finish=lambda parts: [outputs.pixel_bytes(p) for p in parts])
            out[tag] = comm.gather_all(result)
    return out


def nan_everywhere(w: worker.Worker, z: torch.Tensor, comm: Comm) -> list[str]:
    """Each rank's error when only rank 1's band is NaN (patch with a 1-row margin)."""
    try:
        w.decode_tensor(z, "nan", pixels=True)
        error = "no error"
    except VaeparError as exc:
        error = str(exc)
    return comm.gather_all(error)


@pytest.fixture(scope="module")
def launched(kl_models: dict[str, Path], wan_models: dict[str, Path]) -> dict[str, Any]:
    g = torch.Generator().manual_seed(2)
    kl = torch.randn(2, 4, 7, 9, generator=g)
    wan = torch.randn(1, 4, 2, 5, 6, generator=g)
    nan = torch.randn(1, 4, 7, 9, generator=g)
    nan[..., 6, 4] = float("nan")  # rank 1's band (rows 4-6); rank 0 reads rows 0-4 with its margin

    def cfg(model: Path, **extra: Any) -> worker.WorkerConfig:
        return worker.WorkerConfig(model=resolve(str(model)), device="cpu", threads=1, show_progress=False,
                                   factors=None, **extra)

    runs = [("kl_tiled", cfg(kl_models["kl4"], strategy="tiled", tile_size=KL_TILE), kl),
            ("kl_shard", cfg(kl_models["kl4"], strategy="shard"), kl),
            ("kl_patch", cfg(kl_models["kl4"], strategy="patch", halo=1), kl),
            ("wan22_shard", cfg(wan_models["wan22"], strategy="shard"), wan),
            ("wan22_tiled", cfg(wan_models["wan22"], strategy="tiled", tile_size=64), wan)]
    result = launch.run(launch.LaunchSpec(nproc=2), probe, runs, nan)
    return {"result": result, "inputs": {tag: z for tag, _, z in runs}}


RUNS = ["kl_tiled", "kl_shard", "kl_patch", "wan22_shard", "wan22_tiled"]


@pytest.mark.parametrize("tag", RUNS)
def test_pixels_equal_the_float_results_pixels(launched: dict[str, Any], tag: str) -> None:
    floats, _ = launched["result"][tag, False]
    pixels, _ = launched["result"][tag, True]
    assert floats.dtype == torch.float32 and pixels.dtype == torch.uint8
    assert pixels.shape == floats.shape  # Wan 2.2: unpatchified on rank 0, from the uint8 gather
    assert np.array_equal(outputs.to_uint8(pixels), old_to_uint8(floats)), tag


@pytest.mark.parametrize("tag", RUNS)
def test_every_rank_hands_the_join_uint8(launched: dict[str, Any], tag: str) -> None:
    _, float_parts = launched["result"][tag, False]
    _, pixel_parts = launched["result"][tag, True]
    assert all(parts for parts in pixel_parts), "each rank has a part of these inputs"
    assert {d for parts in float_parts for d, _ in parts} == {"torch.float32"}
    assert {d for parts in pixel_parts for d, _ in parts} == {"torch.uint8"}
    for rank, (f, p) in enumerate(zip(float_parts, pixel_parts)):
        assert sum(n for _, n in p) * 4 == sum(n for _, n in f), (tag, rank)


def test_share_with_a_finish_gives_every_rank_the_pixels(launched: dict[str, Any]) -> None:
    for tag, per_rank in launched["result"]["share"].items():
        floats, _ = launched["result"][tag, False]
        for got in per_rank:
            assert got.dtype == torch.uint8
            assert torch.equal(got, outputs.pixel_bytes(floats)), tag


def test_a_nan_on_one_ranks_part_stops_every_rank_with_the_same_line(launched: dict[str, Any]) -> None:
    errors = launched["result"]["nan"]
    assert len(set(errors)) == 1, errors
    assert errors[0].startswith("nan: the decoded result has non-finite values (") and "nothing was written" in errors[0]


# -- the CLI on 2 workers -----------------------------------------------------------------------

def decode(*args: str | Path) -> Any:
    return CliRunner().invoke(app, ["decode", *map(str, args), "--device", "cpu", "--threads", "1", "--raw", "--quiet"])


def write_inputs(folder: Path, zs: dict[str, torch.Tensor]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    return [save_latents(folder / f"{name}.safetensors", z) for name, z in zs.items()]


@pytest.mark.parametrize("strategy", ["tiled", "shard"])
def test_several_inputs_to_png_equal_the_float_path(kl_models: dict[str, Path], launched: dict[str, Any],
                                                    tmp_path: Path, strategy: str) -> None:
    g = torch.Generator().manual_seed(3)
    zs = {"first": launched["inputs"]["kl_" + strategy], "second": torch.randn(1, 4, 5, 6, generator=g),
          "third": torch.randn(2, 4, 6, 3, generator=g)}
    inputs = write_inputs(tmp_path / "in", zs)
    tiling = ["--tile-size", str(KL_TILE)] if strategy == "tiled" else []
    result = decode(*inputs, "--model", kl_models["kl4"], "--out", tmp_path / "png", "--format", "png",
                    "--strategy", strategy, *tiling, "--nproc", "2", "--json", tmp_path / "run.json")
    assert result.exit_code == 0, result.output
    if strategy == "tiled":  # tiled is exact on any worker count: the 1-worker float path
        result = decode(*inputs, "--model", kl_models["kl4"], "--out", tmp_path / "floats", "--format",
                        "safetensors", "--strategy", strategy, *tiling)
        assert result.exit_code == 0, result.output
        want = {n: old_to_uint8(load_file(tmp_path / "floats" / f"{n}.safetensors")["sample"]) for n in zs}
    else:  # shard's float rounding follows the bands: the float path on the same 2 workers
        want = {"first": old_to_uint8(launched["result"]["kl_shard", False][0])}
    files = sorted(p.name for p in (tmp_path / "png").iterdir())
    assert files == ["first_0.png", "first_1.png", "second.png", "third_0.png", "third_1.png"]
    for name, pixels in want.items():
        for b, path in enumerate(outputs.image_paths(tmp_path / "png" / f"{name}.png", len(pixels))):
            assert np.array_equal(np.asarray(Image.open(path)), pixels[b]), path.name
    jobs = json.loads((tmp_path / "run.json").read_text())["jobs"]
    assert [len(j["outputs"]) for j in jobs] == [2, 1, 2]
    assert all(Path(o).exists() for j in jobs for o in j["outputs"])


def test_the_next_decode_overlaps_the_previous_write(kl_models: dict[str, Path], tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Writes slowed to 0.4 s: each runs while the next input decodes, and all are written."""
    spans: dict[str, list[tuple[float, float]]] = {"write": [], "decode": []}

    def timed(kind: str, fn: Any) -> Any:
        def run(*args: Any, **kwargs: Any) -> Any:
            t0 = time.monotonic()
            try:
                return fn(*args, **kwargs)
            finally:
                if kind == "write":
                    time.sleep(0.4)
                spans[kind].append((t0, time.monotonic()))
        return run

    monkeypatch.setattr(outputs, "write_sample", timed("write", outputs.write_sample))
    monkeypatch.setattr(worker.Worker, "decode_tensor", timed("decode", worker.Worker.decode_tensor))
    g = torch.Generator().manual_seed(5)
    inputs = write_inputs(tmp_path / "in", {f"z{k}": torch.randn(1, 4, 5, 6, generator=g) for k in range(3)})
    result = decode(*inputs, "--model", kl_models["kl4"], "--out", tmp_path / "out", "--format", "png")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["z0.png", "z1.png", "z2.png"]
    writes, decodes = spans["write"], spans["decode"]
    for k in range(2):
        assert writes[k][0] < decodes[k + 1][1] and decodes[k + 1][0] < writes[k][1], (k, spans)


@pytest.mark.parametrize("nproc", [1, 2])
def test_a_failing_write_is_one_line_and_leaves_no_temporary_file(kl_models: dict[str, Path], tmp_path: Path,
                                                                  nproc: int) -> None:
    """The second input's first file is taken by a folder: the up-front checks (which look at
    ``second.png``) pass, the write fails on the writer's thread."""
    g = torch.Generator().manual_seed(4)
    zs = {"first": torch.randn(1, 4, 5, 6, generator=g), "second": torch.randn(2, 4, 5, 6, generator=g),
          "third": torch.randn(1, 4, 5, 6, generator=g), "fourth": torch.randn(1, 4, 5, 6, generator=g)}
    inputs = write_inputs(tmp_path / "in", zs)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "second_0.png").mkdir()
    result = decode(*inputs, "--model", kl_models["kl4"], "--out", tmp_path / "out", "--format", "png",
                    "--strategy", "shard", "--nproc", str(nproc))
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "second.png: cannot write the output (Is a directory)" in lines[0]
    left = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert not [n for n in left if n.startswith(".")], left  # no temporary file
    assert "first.png" in left and "second_1.png" not in left, left
