"""Time diffusers' own tiled decode against `vaepar bench`'s tiled strategy on one worker.

Same architecture (configs/architectures/sd-vae.json, random weights), same latent, same tile
settings, same threads. Usage: python scripts/compare_diffusers_tiled.py --resolution 1024 --tile-size 512
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from vaepar import bench, launch, worker
from vaepar.vae import architecture, load


def diffusers_tiled(resolution: int, tile: int, repeats: int) -> list[float]:
    spec = architecture("sd-vae")
    vae = load(spec, torch.device("cpu"), torch.float32)
    vae.enable_tiling()
    vae.tile_sample_min_size, vae.tile_latent_min_size, vae.tile_overlap_factor = tile, tile // 8, 0.25
    z = torch.randn((1, 4, resolution // 8, resolution // 8), generator=torch.Generator().manual_seed(0))
    times = []
    with torch.inference_mode():
        for _ in range(repeats + 1):
            t0 = time.perf_counter()
            vae.decode(z)
            times.append(time.perf_counter() - t0)
    return times[1:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--resolution", type=int, default=1024)
    ap.add_argument("--tile-size", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(launch.default_threads(1))
    theirs = statistics.median(diffusers_tiled(args.resolution, args.tile_size, args.repeats))
    cfg = worker.WorkerConfig(model=architecture("sd-vae"), tile_size=args.tile_size, show_progress=False)
    b = bench.BenchConfig(cfg=cfg, task="decode", shape=(1, 4, args.resolution // 8, args.resolution // 8),
                          counts=(1,), strategies=("tiled",), repeats=args.repeats, warmup=1)
    ours = bench.measure(b)["runs"][0]["seconds"]
    print(f"diffusers tiled decode: {theirs:.3f} s; vaepar tiled, 1 worker: {ours:.3f} s; "
          f"ratio {ours / theirs:.3f} ({torch.get_num_threads()} threads, {bench.device_name('cpu')})")


if __name__ == "__main__":
    main()
