"""The ``shard`` and ``patch`` strategies (vaepar/shard.py).

* Integration (gloo, one intra-op thread per worker): ``shard`` decode and encode of the tiny KL
  (4 and 16 latent channels) and Wan 2.1 / 2.2 models on 2, 3 and 4 workers, batch 1 and 2, row
  counts that do not divide among the workers and fewer latent rows than workers, equal
  diffusers' own untiled ``vae.decode(z).sample`` / ``vae.encode(x).latent_dist.mode()`` up to
  float rounding: max |shard - untiled| <= 1e-4 * max(1, max |untiled|) in float32.
* Units: halo convolutions and the GroupNorm statistics on bands in one process; in one 3-rank
  launch, ``Context.exchange_rows``, the conv wrappers, ``ShardGroupNorm`` (one collective per
  norm; float32 and bfloat16 bands with wildly different statistics), ``QuerySplitAttention`` (one
  K/V gather per layer, each rank's queries only), ``FrameSplitAttention`` (Wan's per-frame
  attention, split the same way), ``CausalSplitAttention`` (HunyuanVideo 1.5's frame-causal
  attention) and ``HaloCausalConv3d`` on bands of known tensors over real gloo traffic.
* ``patch`` and ``tiled``: their error against untiled, measured; patch's falls as its margin grows
  and is zero once the margin covers the input.
* ``shard.install`` is inert outside shard runs.

Starting workers dominates the run time here: every spawned worker imports torch and diffusers
(about 20 s for 2 workers, 35 s for 3 and 55 s for 4 on a 2-core machine), so each worker count is
launched once and that launch runs every model's jobs (and the probes) through real
:class:`vaepar.worker.Worker` objects sharing one process group: see :func:`serve`.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from typer.testing import CliRunner

from conftest import reference, reference_decode, save_latents, single_thread, with_ltx2
from vaepar import launch, plan, shard, worker
from vaepar.cli import app
from vaepar.comm import Comm
from vaepar.errors import VaeparError
from vaepar.vae import load as load_vae
from vaepar.vae import resolve

SCALES = {"kl4": 4, "kl16": 4, "flux2": 4, "wan21": 8, "wan22": 16, "qwen": 8, "hv15": 16, "ltx2": 32}
CHANNELS = {"kl4": 4, "kl16": 16, "flux2": 4, "wan21": 4, "wan22": 4, "qwen": 4, "hv15": 4, "ltx2": 8}
VIDEO = ("wan21", "wan22", "hv15", "ltx2")

# Latent rows: 7 and 5 divide evenly among none of 2, 3 and 4 workers (bands 4+3, 3+2+2, 2+2+2+1;
# 3+2, 2+2+1, 2+1+1+1); 2 and 1 rows leave workers without a band. Encode inputs are pixels with
# the same latent rows. Wan: 3 latent frames go through the time caches twice (decode), 5 frames
# are two encoder chunks.
KL_CASES = {  # name: (task, shape in latents (decode) or pixels / scale (encode))
    "dec_b1": ("decode", (1, 7, 9)), "dec_b2": ("decode", (2, 5, 6)),
    "dec_1row": ("decode", (1, 1, 9)), "dec_2rows": ("decode", (1, 2, 7)),
    "enc_b1": ("encode", (1, 7, 9)), "enc_b2": ("encode", (2, 5, 6)), "enc_2rows": ("encode", (1, 2, 5)),
}
WAN_FRAMES = {"dec_b1": 3, "dec_b2": 1, "dec_1row": 2, "dec_2rows": 1, "enc_b1": 5, "enc_b2": 1, "enc_2rows": 1}
FRAMES = {"ltx2": {"enc_b1": 9}}  # LTX-2 encodes 1 + 8k frames
# LTX-2's decoder pads by reflection: diffusers (and vaepar, with one clear line) refuse 1 latent row.
SKIP = {"ltx2": ("dec_1row",)}

# One launch per worker count; 4 workers for all but the 16-channel KL and Wan 2.1.
LAUNCHES = {2: ("kl4", "kl16", "flux2", "wan21", "wan22", "qwen", "hv15", "ltx2"),
            3: ("kl4", "kl16", "flux2", "wan21", "wan22", "qwen", "hv15", "ltx2"),
            4: ("kl4", "flux2", "wan22", "qwen", "hv15", "ltx2")}
MATRIX = [with_ltx2(m, n) for n, ms in LAUNCHES.items() for m in ms]

# patch (margin 1 and the default 8 latent rows) and tiled, against untiled, on 3 workers.
COMPARED = ("kl4", "wan21")
COMPARE_RUNS = {"patch_halo1": dict(strategy="patch", halo=1), "patch_halo8": dict(strategy="patch", halo=8),
                "patch_halo24": dict(strategy="patch", halo=24), "tiled_32": dict(strategy="tiled", tile_size=32)}
# tiled on 2 and 3 workers for the families whose 1-worker runs are in test_families: bit-identical
# to the class's own tiled decode and encode.
TILED_EXACT = {  # model: (tile size, overlap, cases); 3x3 tiles over the b1 cases (LTX-2: 2x2)
    "qwen": (32, 0.25, ["dec_b1", "dec_b2", "enc_b1", "enc_b2"]),
    "hv15": (64, 0.25, ["dec_b1", "dec_b2", "enc_b1", "enc_b2"]),
    "ltx2": (256, 0.375, ["dec_b1", "enc_b1"]),  # a stride of 5 latent rows leaves no 1-row tile
}
TALL = {"dec_tall": ("decode", (1, 24, 10)), "enc_tall": ("encode", (1, 24, 10))}

MEASURED: dict[tuple[str, str], list[tuple[float, float, str]]] = {}  # (model, what): (abs, rel, where)


def tolerance(want: torch.Tensor) -> float:
    return 1e-4 * max(1.0, want.abs().max().item())


def shape_of(model: str, task: str, dims: tuple[int, int, int], frames: int) -> tuple[int, ...]:
    b, h, w = dims
    video = model in VIDEO
    if task == "decode":
        return (b, CHANNELS[model], *([frames] if video else []), h, w)
    s = SCALES[model]
    return (b, 3, *([frames] if video else []), h * s, w * s)


# -- the launches ------------------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True, slots=True)
class Case:
    model: str
    name: str
    task: str
    source: Path
    x: torch.Tensor


@pytest.fixture(scope="module")
def models(kl_models: dict[str, Path], flux2_models: dict[str, Path], wan_models: dict[str, Path],
           family_models: dict[str, Path]) -> dict[str, Path]:
    return {**kl_models, **flux2_models, **wan_models, **family_models}


@pytest.fixture(scope="module")
def cases(models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Case]]:
    """Input files for every model (written once, shared by all launches)."""
    folder = tmp_path_factory.mktemp("shard_in")
    g = torch.Generator().manual_seed(0)
    out: dict[str, dict[str, Case]] = {}
    for model in models:
        table = dict(KL_CASES) | (TALL if model in COMPARED else {})
        out[model] = {}
        for name, (task, dims) in table.items():
            if name in SKIP.get(model, ()):
                continue
            frames = FRAMES.get(model, {}).get(name, WAN_FRAMES.get(name, 5 if task == "encode" else 2))
            x = shape_of(model, task, dims, frames)
            if task == "decode":
                t = torch.randn(x, generator=g)
                src = save_latents(folder / f"{model}_{name}.safetensors", t)
            else:
                t = torch.rand(x, generator=g) * 2 - 1
                src = folder / f"{model}_{name}.safetensors"
                save_file({"sample": t}, str(src))
            out[model][name] = Case(model=model, name=name, task=task, source=src, x=t)
    return out


def jobs_for(cs: dict[str, Case], names: list[str], out: Path) -> list[worker.DecodeJob | worker.EncodeJob]:
    out.mkdir(parents=True, exist_ok=True)
    jobs: list[worker.DecodeJob | worker.EncodeJob] = []
    for n in names:
        c = cs[n]
        if c.task == "decode":
            jobs.append(worker.DecodeJob(source=c.source, output=out / f"{n}.safetensors"))
        else:
            jobs.append(worker.EncodeJob(source=c.source, output=out / f"{n}.safetensors"))
    return jobs


def serve(runs: list[tuple[worker.WorkerConfig, list[Any]]], probe: bool) -> dict[str, Any] | None:
    """Every rank: join the group once, run each configuration's jobs through a real Worker (as
    :func:`vaepar.worker.main` does, but with every Worker sharing the one group, so that a single
    launch serves several models), then optionally the distributed unit probes."""
    comm = Comm.join("cpu")
    try:
        reports = []
        with mock.patch.object(Comm, "join", return_value=comm):
            for cfg, jobs in runs:
                w = worker.Worker(cfg)
                reports.append([w.decode(j) if isinstance(j, worker.DecodeJob) else w.encode(j) for j in jobs])
        probes = dist_probes(comm) if probe else None
    finally:
        comm.close()
    return {"reports": reports, "probes": probes} if comm.rank == 0 else None


@pytest.fixture(scope="module")
def launched(models: dict[str, Path], cases: dict[str, dict[str, Case]],
             tmp_path_factory: pytest.TempPathFactory) -> Callable[[int], dict[str, Any]]:
    """``launched(n)``: the one launch with ``n`` workers (run on first use), as
    {"outputs": {model: {run: {case: (report, output file)}}}, "probes": ...}; run is "shard", or
    on 3 workers one of COMPARE_RUNS."""
    done: dict[int, dict[str, Any]] = {}

    def get(nproc: int) -> dict[str, Any]:
        if nproc in done:
            return done[nproc]
        root = tmp_path_factory.mktemp(f"shard_out{nproc}")
        runs, tags = [], []
        for model in (m for m in LAUNCHES[nproc] if m in models):  # LTX-2 needs diffusers >= 0.37
            names = [n for n in KL_CASES if n not in SKIP.get(model, ())]
            names += list(TALL) if nproc == 3 and model in COMPARED else []
            cfg = worker.WorkerConfig(model=resolve(str(models[model])), device="cpu", strategy="shard",
                                      threads=1, show_progress=False, factors=None)
            runs.append((cfg, jobs_for(cases[model], names, root / model)))
            tags.append((model, "shard", names))
        if nproc == 3:
            for model in COMPARED:
                for tag, extra in COMPARE_RUNS.items():
                    cfg = worker.WorkerConfig(model=resolve(str(models[model])), device="cpu", threads=1,
                                              show_progress=False, factors=None, **extra)
                    runs.append((cfg, jobs_for(cases[model], list(TALL), root / f"{model}_{tag}")))
                    tags.append((model, tag, list(TALL)))
        for model, (tile, overlap, names) in TILED_EXACT.items() if nproc in (2, 3) else ():
            if model not in models:
                continue
            cfg = worker.WorkerConfig(model=resolve(str(models[model])), device="cpu", threads=1, show_progress=False,
                                      factors=None, strategy="tiled", tile_size=tile, tile_overlap=overlap)
            runs.append((cfg, jobs_for(cases[model], names, root / f"{model}_tiled")))
            tags.append((model, "tiled", names))
            if nproc == 2:  # patch with a margin over the whole input: every rank runs the untiled model
                cfg = replace(cfg, strategy="patch", tile_size=None, tile_overlap=None, halo=8)
                runs.append((cfg, jobs_for(cases[model], ["dec_b1", "enc_b1"], root / f"{model}_patch")))
                tags.append((model, "patch", ["dec_b1", "enc_b1"]))
        result = launch.run(launch.LaunchSpec(nproc=nproc), serve, runs, nproc == 3)
        outputs: dict[str, dict[str, dict[str, Any]]] = {}
        for (model, tag, names), (_, jobs), reports in zip(tags, runs, result["reports"]):
            outputs.setdefault(model, {})[tag] = {n: (r, j.output) for n, j, r in zip(names, jobs, reports)}
        done[nproc] = {"outputs": outputs, "probes": result["probes"]}
        return done[nproc]

    return get


_REFS: dict[tuple[str, str], torch.Tensor] = {}


def untiled(models: dict[str, Path], case: Case) -> torch.Tensor:
    key = (case.model, case.name)
    if key not in _REFS:
        _REFS[key] = reference(models[case.model], case.task, case.x)
    return _REFS[key]


def read_output(task: str, path: Path) -> torch.Tensor:
    return load_file(path)["sample" if task == "decode" else "latents"]


def record(model: str, what: str, got: torch.Tensor, want: torch.Tensor, where: str) -> tuple[float, float]:
    err = (got - want).abs().max().item()
    rel = err / max(1.0, want.abs().max().item())
    MEASURED.setdefault((model, what), []).append((err, rel, where))
    print(f"  {model:6} {what:18} {where:22} max|diff| {err:.3e}  relative {rel:.3e}")
    return err, rel


def latent_rows(model: str, case: Case) -> tuple[int, int]:
    """Latent rows of the case and input rows per latent row (the band unit)."""
    if case.task == "decode":
        return case.x.shape[-2], 1
    unit = SCALES[model] // (2 if model == "wan22" else 1)  # Wan 2.2 bands patchified pixels
    return case.x.shape[-2] // SCALES[model], unit


# -- 1. integration: shard equals untiled --------------------------------------------------------

@pytest.mark.parametrize("model,nproc", MATRIX)
def test_shard_equals_untiled(models: dict[str, Path], cases: dict[str, dict[str, Case]],
                              launched: Callable[[int], dict[str, Any]], model: str, nproc: int) -> None:
    outputs = launched(nproc)["outputs"][model]["shard"]
    for name, (report, path) in outputs.items():
        case = cases[model][name]
        got, want = read_output(case.task, path), untiled(models, case)
        assert got.shape == want.shape, f"{name}: {tuple(got.shape)} != {tuple(want.shape)}"
        err, _ = record(model, case.task, got, want, f"{nproc} workers {name}")
        assert err <= tolerance(want), f"{model} {name} on {nproc} workers: max diff {err}"
        # Every rank took the same decision: min(rows, workers) bands, the rest idle.
        rows, unit = latent_rows(model, case)
        bands = plan.bands(rows, nproc)
        assert report.strategy == "shard" and report.tiles == len(bands), name
        assert len(report.ranks) == nproc
        for rank, stats in enumerate(report.ranks):
            if rank < len(bands):
                a, b = bands[rank]
                assert stats.band == [a * unit, b * unit] and stats.tiles == 1, (name, rank, stats)
                assert (stats.exchanges > 0) == (len(bands) > 1), (name, rank, stats)
            else:
                assert stats.band == [0, 0] and stats.tiles == 0 and stats.exchanges == 0, (name, rank, stats)


@pytest.mark.parametrize("model,nproc", [with_ltx2(m, n) for n in (2, 3) for m in TILED_EXACT])
def test_tiled_equals_the_class_tiled_loops(models: dict[str, Path], cases: dict[str, dict[str, Case]],
                                             launched: Callable[[int], dict[str, Any]], model: str, nproc: int) -> None:
    for name, (report, path) in launched(nproc)["outputs"][model]["tiled"].items():
        case = cases[model][name]
        tile, overlap, _ = TILED_EXACT[model]
        want = reference(models[model], case.task, case.x, tile=tile, overlap=overlap)
        got = read_output(case.task, path)
        assert report.strategy == "tiled" and report.tiles > 1, name
        assert torch.equal(got, want), f"{model} {name} on {nproc} workers: max diff {(got - want).abs().max()}"


@pytest.mark.parametrize("model", [with_ltx2(m) for m in TILED_EXACT])
def test_patch_with_a_whole_margin_equals_untiled(models: dict[str, Path], cases: dict[str, dict[str, Case]],
                                                 launched: Callable[[int], dict[str, Any]], model: str) -> None:
    for name, (report, path) in launched(2)["outputs"][model]["patch"].items():
        case = cases[model][name]
        assert report.strategy == "patch" and report.tiles == 2, name
        assert torch.equal(read_output(case.task, path), untiled(models, case)), f"{model} {name}"


def test_fewer_rows_than_workers_use_fewer_bands(launched: Callable[[int], dict[str, Any]]) -> None:
    """1 and 2 latent rows on 3 and 4 workers: 1 and 2 bands (checked against untiled above)."""
    for nproc in (3, 4):
        for model, shard_runs in launched(nproc)["outputs"].items():
            shard_out = shard_runs["shard"]
            assert "dec_1row" in SKIP.get(model, ()) or shard_out["dec_1row"][0].tiles == 1
            assert shard_out["dec_2rows"][0].tiles == 2 and shard_out["enc_2rows"][0].tiles == 2


def test_cli_shard_decode(models: dict[str, Path], tmp_path: Path) -> None:
    """`vaepar decode --strategy shard --nproc 2`: 7 latent rows in 2 bands, 1 row in 1 band."""
    g = torch.Generator().manual_seed(7)
    zs = {"tall": torch.randn(1, 16, 7, 9, generator=g), "one_row": torch.randn(2, 16, 1, 6, generator=g)}
    for name, z in zs.items():
        save_latents(tmp_path / f"{name}.safetensors", z)
    result = CliRunner().invoke(app, [
        "decode", *(str(tmp_path / f"{n}.safetensors") for n in zs), "--model", str(models["kl16"]),
        "--out", str(tmp_path / "out"), "--format", "safetensors", "--strategy", "shard", "--nproc", "2",
        "--device", "cpu", "--threads", "1", "--raw", "--quiet", "--json", str(tmp_path / "run.json")])
    assert result.exit_code == 0, result.output
    for name, z in zs.items():
        got = load_file(tmp_path / "out" / f"{name}.safetensors")["sample"]
        want = reference_decode(models["kl16"], z, tile=None)
        assert got.shape == want.shape
        err, _ = record("kl16", "decode (cli)", got, want, f"2 workers {name}")
        assert err <= tolerance(want)
    doc = json.loads((tmp_path / "run.json").read_text())
    assert doc["nproc"] == 2 and doc["strategy"] == "shard"
    assert [j["strategy"] for j in doc["jobs"]] == ["shard", "shard"]
    assert [j["tiles"] for j in doc["jobs"]] == [2, 1]
    assert [r["band"] for r in doc["jobs"][0]["ranks"]] == [[0, 4], [4, 7]]
    assert [r["band"] for r in doc["jobs"][1]["ranks"]] == [[0, 1], [0, 0]]


# -- 2. units: halo convolutions and GroupNorm statistics in one process --------------------------

class BandSim:
    """Stands in for :class:`shard.Context` in one process. It knows the full input of the layer
    under test, so it hands a band its neighbours' rows (zeros past the global edges) exactly as
    ``Context.exchange_rows`` does over the wire."""

    def __init__(self, full: torch.Tensor, a: int, b: int) -> None:
        self.full, self.a, self.b = full, a, b
        self.first, self.last = a == 0, b == full.shape[-2]
        self.exchanges = 0

    def exchange_rows(self, x: torch.Tensor, top: int, bottom: int) -> torch.Tensor:
        assert torch.equal(x, self.full[..., self.a : self.b, :]), "the band is not the expected slice"
        self.exchanges += 1
        return F.pad(self.full, (0, 0, top, bottom))[..., self.a : self.b + top + bottom, :]

    def halos(self, x: torch.Tensor, top: int, bottom: int) -> tuple[torch.Tensor, torch.Tensor]:
        padded = self.exchange_rows(x, top, bottom)
        return padded[..., :top, :], padded[..., padded.shape[-2] - bottom :, :]

    def post_halos(self, x: torch.Tensor, top: int, bottom: int, *, overlapped: bool = True) -> shard.Posted:
        return shard.Posted(lambda: None, self.halos(x, top, bottom))

    def edges(self, x: torch.Tensor, above: torch.Tensor, below: torch.Tensor,
              mode: str) -> tuple[torch.Tensor, torch.Tensor]:
        assert mode == "zeros", "the simulated bands pad with zeros only"
        return above, below


CONV_CASES = ("k1_s1", "k3_s1", "k1_s2", "k3_s2_pad1", "k3_s2_downsample", "k3_s2_wan_resample")
ROW_BANDS = [(0, 1), (1, 6), (6, 14)]   # 14 rows, uneven, one band a single row
EVEN_BANDS = [(0, 6), (6, 8), (8, 14)]  # band starts even, for stride-2 layers


def make_conv(case: str) -> tuple[nn.Module, tuple[int, int] | None]:
    """A layer with 6 input channels, and the halo (top, bottom) it needs when built by hand
    (None: ``shard.install`` wraps it, as it does in the VAEs)."""
    from diffusers.models.downsampling import Downsample2D

    torch.manual_seed(0)
    return {
        "k1_s1": (nn.Conv2d(6, 5, 1), (0, 0)),
        "k3_s1": (nn.Conv2d(6, 5, 3, padding=1), None),
        "k1_s2": (nn.Conv2d(6, 5, 1, stride=2), (0, 0)),
        "k3_s2_pad1": (nn.Conv2d(6, 5, 3, stride=2, padding=1), (1, 0)),
        "k3_s2_downsample": (Downsample2D(6, use_conv=True, out_channels=5, padding=0), None),
        "k3_s2_wan_resample": (nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(6, 5, 3, stride=2)), None),
    }[case]


@pytest.mark.parametrize("case", CONV_CASES)
def test_halo_conv_on_bands_equals_full_conv(case: str) -> None:
    layer, halo = make_conv(case)
    holder = nn.ModuleDict({"layer": layer})
    swapped = shard.install(holder)
    wrapped = holder["layer"]
    if halo is None:  # the VAEs' convolutions: install picks the wrapper and its halo
        assert swapped == 1 and isinstance(wrapped, (shard.HaloConv2d, shard._ShardDownsample))
        if case == "k3_s1":
            assert wrapped.pad == (1, 1)
    if case.startswith("k1"):  # 1x1 convolutions need no halo: install leaves them alone
        assert swapped == 0 and wrapped is layer
    if wrapped is layer:  # the wrapper by hand, with the halo the layer needs
        wrapped = shard.HaloConv2d(layer, halo, inner=layer)
    x = torch.randn(2, 6, 14, 7, generator=torch.Generator().manual_seed(1))
    bands = EVEN_BANDS if "s2" in case else ROW_BANDS
    with torch.no_grad():
        want = layer(x)
        parts = []
        for a, b in bands:
            sim = BandSim(x, a, b)
            with shard.sharding(sim):
                parts.append(wrapped(x[..., a:b, :]))
            assert sim.exchanges == 1
        got = torch.cat(parts, dim=-2)
    assert got.shape == want.shape
    err = (got - want).abs().max().item()
    print(f"  halo conv {case}: max|diff| {err:.3e}")
    assert err <= 1e-5 * max(1.0, want.abs().max().item())


def test_halo_causal_conv3d_with_time_cache_on_bands() -> None:
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d

    torch.manual_seed(0)
    conv = WanCausalConv3d(6, 5, 3, padding=1)
    holder = nn.ModuleDict({"conv": conv})
    assert shard.install(holder) == 1 and isinstance(holder["conv"], shard.HaloCausalConv3d)
    g = torch.Generator().manual_seed(2)
    x, cache = torch.randn(2, 6, 3, 14, 7, generator=g), torch.randn(2, 6, 2, 14, 7, generator=g)
    with torch.no_grad():
        for c in (None, cache[:, :, 1:], cache):
            want = conv(x, c)
            full = x if c is None else torch.cat([c, x], dim=2)
            parts = []
            for a, b in ROW_BANDS:
                with shard.sharding(BandSim(full, a, b)):
                    parts.append(holder["conv"](x[..., a:b, :], None if c is None else c[..., a:b, :]))
            got = torch.cat(parts, dim=-2)
            assert got.shape == want.shape
            assert (got - want).abs().max().item() <= 1e-5 * max(1.0, want.abs().max().item())


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("chunk", [shard.CHUNK, 7])
def test_group_norm_statistics_over_bands(batch: int, layout: str, chunk: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """band_moments of each band, merged -> global statistics; normalize: equals nn.GroupNorm on
    the full tensor, with bands of very different means and scales; in both memory layouts (the
    output keeps the band's), whole or in pieces of 7 elements (merged as the parts of bands are),
    for one sample and two (each sample's statistics its own)."""
    monkeypatch.setattr(shard, "CHUNK", chunk)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(batch, 16, 14, 5, generator=g)
    x[-1] *= 0.2  # the last sample's statistics differ from the first's
    x[..., 1:6, :] += 100.0
    x[..., 6:, :] *= 3.0
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    norm = nn.GroupNorm(4, 16)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(16, generator=g))
        norm.bias.copy_(torch.randn(16, generator=g))
        bands = [x[..., a:b, :].contiguous(memory_format=fmt) for a, b in ROW_BANDS]
        parts = torch.stack([shard.band_moments(band, 4) for band in bands])
        stats = shard.merge_moments(parts, dim=0)
        outs = [shard.normalize(band, stats, norm) for band in bands]
        assert all(o.is_contiguous(memory_format=fmt) for o in outs)
        got = torch.cat(outs, dim=-2)
        want = norm(x)
        exact = F.group_norm(x.double(), 4, norm.weight.double(), norm.bias.double(), norm.eps)
        local = torch.cat([norm(x[..., a:b, :]) for a, b in ROW_BANDS], dim=-2)  # per-band statistics
    assert parts.shape == (3, batch, 4, 3) and stats[0, 0, 0].item() == 4 * 14 * 5
    err, err64 = (got - want).abs().max().item(), (got.double() - exact).abs().max().item()
    print(f"  group norm on bands: vs nn.GroupNorm {err:.3e}, vs float64 {err64:.3e}, "
          f"nn.GroupNorm vs float64 {(want.double() - exact).abs().max().item():.3e}")
    assert err <= 1e-5 * max(1.0, want.abs().max().item())
    assert err64 <= 1e-5 * max(1.0, exact.abs().max().item())
    assert (local - want).abs().max().item() > 0.5  # the test would see per-band statistics


def test_group_norm_of_float64_bands_with_a_float32_norm() -> None:
    """A float64 band under a float32 norm: statistics and normalisation in float64, equal to the
    functional GroupNorm in float64 to its rounding."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(1, 8, 12, 5, generator=g, dtype=torch.float64)
    x[..., 6:, :] = x[..., 6:, :] * 5 + 20
    norm = nn.GroupNorm(2, 8)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(8, generator=g))
        bands = [x[..., :6, :], x[..., 6:, :]]
        stats = shard.merge_moments(torch.stack([shard.band_moments(band, 2) for band in bands]), dim=0)
        got = torch.cat([shard.normalize(band, stats, norm) for band in bands], dim=-2)
        want = F.group_norm(x, 2, norm.weight.double(), norm.bias.double(), norm.eps)
    assert got.dtype == torch.float64
    assert (got - want).abs().max().item() <= 1e-12


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_band_moments_of_low_precision_input_in_pieces(layout: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """bfloat16 bands: moments merged from float32 pieces equal float64 moments of the same values
    (float32 rounding), and normalize returns bfloat16."""
    monkeypatch.setattr(shard, "CHUNK", 40)
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(2, 8, 9, 7, generator=g) * 3 + 40).to(torch.bfloat16)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    norm = nn.GroupNorm(2, 8).to(torch.bfloat16)
    with torch.no_grad():
        got = shard.band_moments(x, 2)
        xg = x.double().reshape(2, 2, -1)
        mean = xg.mean(-1)
        want = torch.stack([torch.full_like(mean, xg.shape[-1]), mean, (xg - mean[..., None]).square().sum(-1)], -1)
        out = shard.normalize(x, got, norm)
    assert got.dtype == torch.float32 and out.dtype == torch.bfloat16
    assert torch.allclose(got.double(), want, rtol=1e-6, atol=0)


# -- 2. units over real gloo traffic: one 3-rank launch (the 3-worker integration launch) ---------

def dist_probes(comm: Comm) -> dict[str, tuple[float, float]] | None:
    """On every rank: the band wrappers over real exchanges on bands of known tensors; rank 0
    returns {piece: (max error over ranks, max |reference|)}."""
    from diffusers import AutoencoderKL
    from diffusers.models.autoencoders.autoencoder_kl_hunyuanvideo15 import (
        HunyuanVideo15AttnBlock,
        HunyuanVideo15CausalConv3d,
    )
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanAttentionBlock, WanCausalConv3d
    from diffusers.models.downsampling import Downsample2D

    assert comm.world == len(EVEN_BANDS)
    a, b = EVEN_BANDS[comm.rank]
    torch.manual_seed(0)  # the same tensors and weights on every rank
    kl = AutoencoderKL(block_out_channels=(16,), down_block_types=("DownEncoderBlock2D",),
                       up_block_types=("UpDecoderBlock2D",), latent_channels=4, norm_num_groups=8,
                       layers_per_block=1)
    originals = {
        "conv k3": nn.Conv2d(16, 8, 3, padding=1),
        "downsample2d": Downsample2D(16, use_conv=True, out_channels=8, padding=0),
        "wan resample": nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(16, 8, 3, stride=2)),
        "group norm": nn.GroupNorm(4, 16),
        "kl attention": kl.decoder.mid_block.attentions[0],
        "wan attention": WanAttentionBlock(16),
        "hv15 attention": HunyuanVideo15AttnBlock(16),
        "hv15 conv3d": HunyuanVideo15CausalConv3d(16, 8, 3),  # pads rows by replication at the edges
        "causal conv3d": WanCausalConv3d(16, 8, 3, padding=1),
    }
    with torch.no_grad():  # affine GroupNorm and non-trivial Wan attention weights
        gn = originals["group norm"]
        gn.weight.copy_(torch.randn(16) * 0.5 + 1.0)
        gn.bias.copy_(torch.randn(16) * 0.5)
        for p in (*originals["wan attention"].parameters(), *originals["hv15 attention"].parameters()):
            p.copy_(torch.randn_like(p) * 0.5)
    wrapped = nn.ModuleDict(originals.copy())
    shard.install(wrapped)
    expected = {"conv k3": shard.HaloConv2d, "downsample2d": shard._ShardDownsample,
                "wan resample": shard.HaloConv2d, "group norm": shard.ShardGroupNorm,
                "kl attention": shard.QuerySplitAttention, "wan attention": shard.FrameSplitAttention,
                "hv15 attention": shard.CausalSplitAttention, "hv15 conv3d": shard.HaloPaddedConv3d,
                "causal conv3d": shard.HaloCausalConv3d}
    assert all(type(wrapped[k]) is t for k, t in expected.items())

    x4, x5, cache = torch.randn(2, 16, 14, 6), torch.randn(2, 16, 3, 14, 6), torch.randn(2, 16, 2, 14, 6)
    spread = x4.clone()
    spread[..., 6:8, :] += 100.0  # band 1's mean far from the others'
    spread[..., 8:, :] *= 3.0
    ctx = shard.Context(comm=comm, index=comm.rank, active=comm.world)
    errs: dict[str, tuple[float, float]] = {}

    def check(name: str, got: torch.Tensor, want: torch.Tensor) -> None:
        errs[name] = ((got - want).abs().max().item(), want.abs().max().item())

    with torch.no_grad():
        for x in (x4, x5):
            for top, bottom in ((1, 1), (0, 1), (1, 0), (2, 2), (0, 0)):
                got = ctx.exchange_rows(x[..., a:b, :], top, bottom)
                want = F.pad(x, (0, 0, top, bottom))[..., a : b + top + bottom, :]
                check(f"exchange_rows {x.ndim}-D ({top},{bottom})", got, want)
        for mode in ("replicate", "reflect"):
            for top, bottom in ((1, 1), (2, 2), (0, 1)):
                got = ctx.exchange_rows(x4[..., a:b, :], top, bottom, mode)
                want = F.pad(x4, (0, 0, top, bottom), mode=mode)[..., a : b + top + bottom, :]
                check(f"exchange_rows {mode} ({top},{bottom})", got, want)
        for name, x in (("conv k3", x4), ("downsample2d", x4), ("wan resample", x4), ("group norm", spread),
                        ("kl attention", x4), ("wan attention", x5), ("hv15 attention", x5[:1]),
                        ("hv15 conv3d", x5)):
            full = originals[name](x)
            rows = full.shape[-2] * a // x.shape[-2], full.shape[-2] * b // x.shape[-2]
            with shard.sharding(ctx):
                got = wrapped[name](x[..., a:b, :])
            check(name, got, full[..., rows[0] : rows[1], :])
        for c in (None, cache):
            with shard.sharding(ctx):
                got = wrapped["causal conv3d"](x5[..., a:b, :], None if c is None else c[..., a:b, :])
            check(f"causal conv3d cache={c is not None}", got, originals["causal conv3d"](x5, c)[..., a:b, :])
        # What the gathering and the global statistics buy: per-band results are far off.
        check("(local group norm)", originals["group norm"](spread[..., a:b, :]),
              originals["group norm"](spread)[..., a:b, :])
        check("(local kl attention)", originals["kl attention"](x4[..., a:b, :]),
              originals["kl attention"](x4)[..., a:b, :])
    errs["(gathers, reductions)"] = (float(ctx.gathers), float(ctx.reductions))
    errs |= staged_probes(comm, originals, wrapped, x4, x5, spread, a, b)
    errs |= norm_probes(shard.Context(comm=comm, index=comm.rank, active=comm.world), a, b)
    errs |= attention_probes(shard.Context(comm=comm, index=comm.rank, active=comm.world), a, b)
    every = comm.gather_all(errs)
    if comm.rank != 0:
        return None
    return {k: (max(e[k][0] for e in every), max(e[k][1] for e in every)) for k in errs}


def wild_bands(g: torch.Generator) -> torch.Tensor:
    """(2, 16, 14, 6) whose EVEN_BANDS differ wildly: ~1e3 with a tiny spread, ~N(0, 1), ~-50 +- 1e-2."""
    x = torch.randn(2, 16, 14, 6, generator=g)
    x[..., :6, :] = 1e3 + 1e-3 * x[..., :6, :]
    x[..., 8:, :] = -50.0 + 1e-2 * x[..., 8:, :]
    return x


def norm_probes(ctx: shard.Context, a: int, b: int) -> dict[str, tuple[float, float]]:
    """ShardGroupNorm on :func:`wild_bands` in float32 and bfloat16 against F.group_norm in float32
    on the whole tensor (bfloat16: then cast), and its collectives."""
    g = torch.Generator().manual_seed(11)
    x, norm = wild_bands(g), nn.GroupNorm(4, 16)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(16, generator=g) * 0.5 + 1.0)
        norm.bias.copy_(torch.randn(16, generator=g) * 0.5)
    errs: dict[str, tuple[float, float]] = {}
    wrong_dtype = 0
    for dtype in (torch.float32, torch.bfloat16):
        n, xd = copy.deepcopy(norm).to(dtype), x.to(dtype)
        with torch.no_grad():
            want = F.group_norm(xd.float(), 4, n.weight.float(), n.bias.float(), n.eps)[..., a:b, :].to(dtype)
            with shard.sharding(ctx):
                got = shard.ShardGroupNorm(n)(xd[..., a:b, :])
        wrong_dtype += got.dtype != dtype
        diff, ref = (got.float() - want.float()).abs(), want.float().abs()
        errs[f"(wild group norm {str(dtype)[6:]})"] = (diff.max().item(), ref.max().item())
        if dtype == torch.bfloat16:  # one bfloat16 rounding of a float32-exact value, at most
            bound = 2.0**-7 * ref + 1e-5 * max(1.0, ref.max().item())
            errs["(wild group norm bfloat16 / bf16 rounding)"] = ((diff / bound).max().item(), 1.0)
    errs["(group norm calls, collectives)"] = (2.0, float(ctx.reductions))
    errs["(group norm wrong dtypes)"] = (float(wrong_dtype), 0.0)
    return errs


def attention_probes(ctx: shard.Context, a: int, b: int) -> dict[str, tuple[float, float]]:
    """diffusers' Attention as the KL mid block builds it (8 channels, 4 groups), 1 and 2 heads,
    both processors, query-split on bands against the whole block; its collectives and each SDPA's
    query and key lengths; and a processor it does not know, which falls back to gathering."""
    from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0

    class Unchecked(AttnProcessor2_0):
        pass

    g = torch.Generator().manual_seed(12)
    errs: dict[str, tuple[float, float]] = {}
    shapes: list[tuple[int, int]] = []
    sdpa = F.scaled_dot_product_attention

    def spy(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        shapes.append((q.shape[-2], k.shape[-2]))
        return sdpa(q, k, v, **kwargs)

    for heads, processor in ((1, AttnProcessor2_0), (2, AttnProcessor2_0), (2, AttnProcessor), (2, Unchecked)):
        torch.manual_seed(heads)
        attn = Attention(8, heads=heads, dim_head=8 // heads, norm_num_groups=4, eps=1e-6, residual_connection=True,
                         bias=True, upcast_softmax=True, _from_deprecated_attn_block=True, processor=processor())
        x = torch.randn(2, 8, 14, 6, generator=g) * 2
        x[..., 8:, :] += 3.0
        holder = nn.ModuleDict({"attn": attn})
        shard.install(holder)
        assert isinstance(holder["attn"], shard.QuerySplitAttention)
        name = f"split attention {heads} heads {processor.__name__}"
        before = (ctx.gathers, ctx.reductions)
        with torch.no_grad():
            want = attn(x)[..., a:b, :]
            with mock.patch.object(F, "scaled_dot_product_attention", spy), shard.sharding(ctx):
                got = holder["attn"](x[..., a:b, :])
        errs[name] = ((got - want).abs().max().item(), want.abs().max().item())
        errs[f"({name}: gathers, reductions)"] = (float(ctx.gathers - before[0]), float(ctx.reductions - before[1]))
    split, gathered = shapes[:2], shapes[2:]  # AttnProcessor computes its own scores
    off = sum(s != ((b - a) * 6, 14 * 6) for s in split) + sum(s != (14 * 6, 14 * 6) for s in gathered)
    errs["(sdpa calls, with lengths off)"] = (float(len(shapes)), float(off))
    return errs


def staged_probes(comm: Comm, originals: dict[str, nn.Module], wrapped: nn.ModuleDict, x4: torch.Tensor,
                  x5: torch.Tensor, spread: torch.Tensor, a: int, b: int) -> dict[str, tuple[float, float]]:
    """The same pieces with every transfer staged through separate host buffers (as ``--backend
    gloo`` does for CUDA ranks sharing a GPU): the result must equal the direct one bit for bit."""
    staged = replace(comm, staged=True)
    errs = {}
    with torch.no_grad():
        for name, x, args in (("conv k3", x4, ()), ("group norm", spread, ()), ("kl attention", x4, ()),
                              ("wan attention", x5, ()), ("hv15 attention", x5[:1], ()),
                              ("causal conv3d", x5, (None,))):
            got = []
            for c in (comm, staged):
                with shard.sharding(shard.Context(comm=c, index=comm.rank, active=comm.world)):
                    got.append(wrapped[name](x[..., a:b, :], *args))
            errs[f"staged {name}"] = ((got[1] - got[0]).abs().max().item(), got[0].abs().max().item())
    return errs


def test_distributed_pieces_on_three_ranks(launched: Callable[[int], dict[str, Any]]) -> None:
    probes = launched(3)["probes"]
    for name, (err, scale) in probes.items():
        print(f"  3 ranks {name:32} {err:.3e}  (max |reference| {scale:.3g})")
    for name, (err, scale) in probes.items():
        if name.startswith(("exchange_rows", "staged")):
            assert err == 0.0, name  # rows are copied, not computed; staging copies the same bytes
        elif not name.startswith("("):
            assert err <= 1e-4 * max(1.0, scale), name
    assert probes["(local group norm)"][0] > 1.0 and probes["(local kl attention)"][0] > 1e-2
    # 1 reduction per norm (group norm; KL attention's own); 1 K/V gather per attention (KL, Wan, HV15)
    assert probes["(gathers, reductions)"] == (3.0, 2.0)

    # The one-collective GroupNorm on wildly different bands, and the query-split attention.
    assert probes["(group norm calls, collectives)"] == (2.0, 2.0)
    assert probes["(group norm wrong dtypes)"] == (0.0, 0.0)
    err, scale = probes["(wild group norm float32)"]
    assert err <= 1e-5 * max(1.0, scale)
    assert probes["(wild group norm bfloat16 / bf16 rounding)"][0] <= 1.0
    for name, (err, scale) in probes.items():
        if name.startswith("split attention"):
            assert err <= 1e-5 * max(1.0, scale), name
            counts = (1.0, 0.0) if "Unchecked" in name else (1.0, 1.0)  # the fallback gathers rows
            assert probes[f"({name}: gathers, reductions)"] == counts, name
    assert probes["(sdpa calls, with lengths off)"] == (3.0, 0.0)


# -- 3. patch and tiled: measured against untiled -----------------------------------------------

@pytest.mark.parametrize("model", COMPARED)
def test_patch_and_tiled_errors_are_measured(models: dict[str, Path], cases: dict[str, dict[str, Case]],
                                             launched: Callable[[int], dict[str, Any]], model: str,
                                             record_property: Callable[[str, object], None]) -> None:
    """patch's error falls as its margin grows and vanishes once the margin covers the whole input
    (24 rows, bands of 8: every rank runs the untiled model and keeps its rows); tiled has seams."""
    runs = launched(3)["outputs"][model]
    errors: dict[tuple[str, str], float] = {}
    for tag in COMPARE_RUNS:
        for name, (report, path) in runs[tag].items():
            case = cases[model][name]
            got, want = read_output(case.task, path), untiled(models, case)
            assert report.strategy == tag.split("_")[0]
            assert got.shape == want.shape and torch.isfinite(got).all()
            err, rel = record(model, f"{case.task} {tag}", got, want, f"3 workers {name}")
            record_property(f"{tag}_{name}_max_abs_err", err)
            errors[tag, name] = err
            if tag == "patch_halo24":
                assert torch.equal(got, want), f"{name}: a margin over the whole input must equal untiled"
    for name in TALL:
        assert errors["patch_halo1", name] > errors["patch_halo8", name] > 0, name
        assert errors["tiled_32", name] > 0, name
    for name in TALL:  # shard on the same inputs, for comparison (held to the tolerance above)
        assert runs["patch_halo8"][name][0].tiles == 3
        case = cases[model][name]
        record(model, f"{case.task} shard", read_output(case.task, runs["shard"][name][1]), untiled(models, case),
               f"3 workers {name}")


# -- 4. install is inert outside shard runs -------------------------------------------------------

def test_install_is_inert_outside_shard_runs(models: dict[str, Path]) -> None:
    from diffusers import AutoencoderKL, AutoencoderKLWan

    g = torch.Generator().manual_seed(4)
    with single_thread(), torch.no_grad():
        for model in ("kl4", "kl16", "wan21", "wan22"):
            video = model.startswith("wan")
            plain = (AutoencoderKLWan if video else AutoencoderKL).from_pretrained(models[model]).eval()
            installed = copy.deepcopy(plain)
            assert shard.install(installed) > 0
            s = SCALES[model]
            z = torch.randn(1, CHANNELS[model], *([2] if video else []), 9, 7, generator=g)
            x = torch.rand(1, 3, *([5] if video else []), 9 * s, 7 * s, generator=g) * 2 - 1
            for tiling in (False, True):
                for vae in (plain, installed):
                    if not tiling:
                        vae.disable_tiling()
                    elif video:
                        vae.enable_tiling(tile_sample_min_height=4 * s, tile_sample_min_width=4 * s,
                                          tile_sample_stride_height=3 * s, tile_sample_stride_width=3 * s)
                    else:
                        vae.enable_tiling()
                        vae.tile_sample_min_size, vae.tile_latent_min_size = 4 * s, 4
                got, want = installed.decode(z).sample, plain.decode(z).sample
                assert torch.equal(got, want), f"{model} decode, tiling={tiling}"
                got = installed.encode(x).latent_dist.mode()
                assert torch.equal(got, plain.encode(x).latent_dist.mode()), f"{model} encode, tiling={tiling}"


# -- summary --------------------------------------------------------------------------------------

def test_report_worst_measured_errors() -> None:
    """Prints the worst measured error per model and task (run with -s to see it)."""
    print("\n  worst max|x - untiled| per model / task (absolute, relative to max(1, max|untiled|)):")
    for (model, what), values in sorted(MEASURED.items()):
        err, rel, where = max(values)
        print(f"  {model:6} {what:22} {err:.3e}  {rel:.3e}  ({where}, {len(values)} outputs)")


def test_shard_refuses_a_model_its_wrappers_cannot_split(models: dict[str, Path]) -> None:
    """A row-mixing module outside every wrapper (here: one convolution put back unwrapped) makes
    ``shard`` refuse with one line naming it, before any rank computes or communicates."""
    from vaepar import engine

    spec = resolve(str(models["kl4"]))
    vae = load_vae(spec, torch.device("cpu"), torch.float32)
    shard.install(vae, spec.family.shard_leaves())
    family = spec.family(vae, spec)
    engine.check_shardable(family)  # every conv and norm wrapped: accepted
    vae.decoder.conv_in = shard.original(vae.decoder.conv_in)
    assert shard.unhandled(vae) == ["decoder.conv_in (Conv2d)"]
    with pytest.raises(VaeparError, match=r"cannot split this AutoencoderKL exactly: decoder.conv_in \(Conv2d\)"):
        engine.execute(family, "decode", "shard", torch.zeros(1, 4, 4, 4), plan.Grid(
            rows=plan.single(4, 16), cols=plan.single(4, 16)), comm=None)  # type: ignore[arg-type]
