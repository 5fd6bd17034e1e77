"""scripts/compare_peers.py's bookkeeping: launch order over rounds, the summary of launches and
each method's allocator environment."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "compare_peers.py"


@pytest.fixture(scope="module")
def cp():
    spec = importlib.util.spec_from_file_location("compare_peers", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it is executed
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def test_rounds_alternate_the_order(cp) -> None:
    assert cp.launch_order(("a", "b"), 1) == ["a", "b"]
    assert cp.launch_order(("a", "b", "c"), 3) == ["a", "b", "c", "c", "b", "a", "a", "b", "c"]


def _settings(cp, rounds: int):
    return cp.Settings(resolution=64, threads=1, repeats=2, warmup=0, tile_size=32,
                       methods=("vaepar-tiled",), rounds=rounds)


def test_summary_pools_times_and_takes_median_peaks(cp) -> None:
    ref = torch.zeros(1, 3, 4, 4)
    launches = [
        {"runs": [cp.RankRun(times=[3.0, 1.0], peak=10), cp.RankRun(times=[3.0, 1.0], peak=50)],
         "output": torch.full((1, 3, 4, 4), 9.0)},
        {"runs": [cp.RankRun(times=[2.0, 4.0], peak=30), cp.RankRun(times=[2.0, 4.0], peak=20)],
         "output": torch.full((1, 3, 4, 4), 0.5)},
        {"runs": [cp.RankRun(times=[5.0, 6.0], peak=20), cp.RankRun(times=[5.0, 6.0], peak=40)],
         "output": torch.full((1, 3, 4, 4), 0.25)},
    ]
    r = cp.summarise("vaepar-tiled", launches, ref, _settings(cp, 3))
    assert r.times == [3.0, 1.0, 2.0, 4.0, 5.0, 6.0]
    assert r.seconds == 3.5  # median of all six timed decodes
    assert r.launch_seconds == [2.0, 3.0, 5.5]
    assert r.launch_peaks == [50, 30, 40]
    assert r.peak_mem_bytes == [20, 40]  # per rank, median over the launches
    assert r.max_abs_err == 0.25  # the last launch's output
    assert r.note == ""


def test_a_failed_launch_is_reported_not_averaged(cp) -> None:
    launches = [
        {"runs": [cp.RankRun(times=[1.0], peak=1), cp.RankRun(times=[1.0], peak=1)], "output": None},
        {"runs": [cp.RankRun(error="ValueError: no"), cp.RankRun(error="ValueError: no")], "output": None},
    ]
    r = cp.summarise("vaepar-tiled", launches, None, _settings(cp, 2))
    assert r.seconds is None and r.note == "ValueError: no"


def test_spread_of_launches(cp) -> None:
    assert cp.spread([], str) == "-"
    assert cp.spread([2.0, 2.0], lambda v: f"{v:.1f}") == "2.0"
    assert cp.spread([3.0, 1.0, 2.0], lambda v: f"{v:.1f}") == "1.0 – 3.0"


def test_rounds_must_be_positive(cp) -> None:
    with pytest.raises(SystemExit):
        cp.parse_args(["--rounds", "0"])
    assert cp.parse_args(["--rounds", "4", "--methods", "vaepar-tiled,distvae-tiled"]).methods == (
        "distvae-tiled", "vaepar-tiled")


def test_each_method_gets_its_own_tools_huge_page_setting(cp, monkeypatch: pytest.MonkeyPatch) -> None:
    def on(method: str, choice: str) -> bool:
        return cp.uses_huge_pages(method, cp.Settings(resolution=64, threads=1, repeats=1, warmup=0, tile_size=32,
                                                      methods=(method,), huge_pages=choice))

    assert [on(m, "vaepar") for m in ("vaepar-tiled", "vaepar-untiled", "distvae-tiled", "untiled")] == [
        True, True, False, False]
    assert on("distvae-patch", "all") and not on("vaepar-shard", "none")
    monkeypatch.setenv("THP_MEM_ALLOC_ENABLE", "0")
    with cp.environment(cp.worker_env(True)):
        assert cp.os.environ["THP_MEM_ALLOC_ENABLE"] == "1"
    with cp.environment(cp.worker_env(False)):
        assert "THP_MEM_ALLOC_ENABLE" not in cp.os.environ
    assert cp.os.environ["THP_MEM_ALLOC_ENABLE"] == "0"
