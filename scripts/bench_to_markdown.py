"""Render `vaepar bench --json` (measured or --plan) files as Markdown tables for docs/benchmarks.md.

Usage: python scripts/bench_to_markdown.py docs/bench-sd-1024-cpu.json [more.json ...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from vaepar.report import human_bytes, human_flops


def _f(v: float | None, fmt: str) -> str:
    return "–" if v is None else format(v, fmt)


def _seconds(v: float | None) -> str:
    return _f(v, ".3f" if v is not None and v < 10 else ".2f")


def measured(doc: dict) -> str:
    lines = [f"{doc['model']}, {doc['task']} of latents {doc['latent_shape']}, {doc['dtype']}, "
             f"median of {doc['repeats']} after {doc['warmup']} warm-up, on {doc['device']}"
             + (f", {doc['threads_per_worker']} thread(s) per worker" if doc.get("threads_per_worker") else ""), "",
             "| strategy | workers | median s | peak mem / rank | speedup | efficiency | max abs err | work |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in doc["runs"]:
        mem = "–" if r["peak_mem_bytes"] is None else human_bytes(r["peak_mem_bytes"])
        lines.append(f"| {r['strategy']} | {r['nproc']} | {_seconds(r['seconds'])} | {mem} | "
                     f"{_f(r['speedup'], '.2f')} | {_f(r['efficiency'], '.2f')} | {_f(r['max_abs_err'], '.1e')} | "
                     f"{_f(r['work'] or None, '.2f')} |")
    lines += [f"\n{n}" for n in doc.get("notes", [])]
    return "\n".join(lines)


def planned(doc: dict) -> str:
    lines = [f"{doc['model']}, {doc['task']} of latents {doc['latent_shape']}, {doc['dtype']} (predicted)", "",
             "| strategy | workers | imbalance | work | sent / rank | hidden by overlap | halo exchanges | "
             "attention / rank | activations / rank |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in doc["plan"]:
        hidden = r.get("bytes_overlapped_per_rank")  # absent in plans written before they were counted
        attention = r.get("attention_flops_per_rank")
        lines.append(f"| {r['strategy']} | {r['nproc']} | {r['imbalance']:.2f} | {r['work']:.2f} | "
                     f"{human_bytes(r['bytes_sent_per_rank'])} | {'–' if hidden is None else human_bytes(hidden)} | "
                     f"{r['exchanges']} | {'–' if attention is None else human_flops(attention)} | "
                     f"{human_bytes(r['activation_bytes_per_rank'])} |")
    return "\n".join(lines)


def main() -> None:
    for name in sys.argv[1:]:
        doc = json.loads(Path(name).read_text())
        print(planned(doc) if "plan" in doc else measured(doc))
        print()


if __name__ == "__main__":
    main()
