"""Time diffusers' own tiled decode against vaepar's tiled strategy on one worker, interleaved.

Same architecture (configs/architectures/sd-vae.json, random weights), same latent, same tile
settings, same threads, one process. The two alternate in A-B-B-A order so that the drift of a
shared or throttled machine falls on both alike; the ratio is taken per round.
Usage: python scripts/compare_diffusers_tiled.py --resolution 512 --tile-size 256 --rounds 6
       [--device cuda --dtype bfloat16]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from vaepar import bench, launch, worker
from vaepar.vae import architecture, load


def diffusers_vae(tile: int, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """The SD VAE architecture, tiled exactly as ``--tile-size tile --tile-overlap 0.25``."""
    vae = load(architecture("sd-vae"), device, dtype)
    vae.enable_tiling()
    vae.tile_sample_min_size, vae.tile_latent_min_size, vae.tile_overlap_factor = tile, tile // 8, 0.25
    return vae


@torch.inference_mode()
def time_diffusers(vae: torch.nn.Module, z: torch.Tensor) -> float:
    if z.is_cuda:
        torch.cuda.synchronize(z.device)
    t0 = time.perf_counter()
    vae.decode(z)
    if z.is_cuda:
        torch.cuda.synchronize(z.device)
    return time.perf_counter() - t0


def time_vaepar(w: worker.Worker, shape: tuple[int, ...]) -> float:
    job = worker.BenchJob(task="decode", strategy="tiled", shape=shape, repeats=1, warmup=0)
    result = w.bench(job)
    assert result is not None and result.seconds is not None
    return result.seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--resolution", type=int, default=512)
    ap.add_argument("--tile-size", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--dtype", choices=tuple(worker.DTYPES), default="float32")
    args = ap.parse_args()
    device, dtype = torch.device(args.device), worker.DTYPES[args.dtype]
    torch.set_num_threads(launch.default_threads(1))
    shape = (1, 4, args.resolution // 8, args.resolution // 8)
    z = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    vae = diffusers_vae(args.tile_size, device, dtype)
    w = worker.Worker(worker.WorkerConfig(model=architecture("sd-vae"), tile_size=args.tile_size,
                                          device=args.device, dtype=args.dtype,
                                          show_progress=False, threads=launch.default_threads(1)))
    time_diffusers(vae, z)  # warm-up: first-call allocations and thread start-up
    time_vaepar(w, shape)
    theirs, ours = [], []
    for r in range(args.rounds):
        if r % 2 == 0:
            theirs.append(time_diffusers(vae, z))
            ours.append(time_vaepar(w, shape))
        else:
            ours.append(time_vaepar(w, shape))
            theirs.append(time_diffusers(vae, z))
        print(f"round {r + 1}: diffusers {theirs[-1]:.2f} s, vaepar {ours[-1]:.2f} s, "
              f"ratio {ours[-1] / theirs[-1]:.3f}", flush=True)
    ratios = [o / t for o, t in zip(ours, theirs)]
    print(f"{args.resolution}x{args.resolution}, tile {args.tile_size}, {args.dtype}, "
          f"{torch.get_num_threads()} threads, {bench.device_name(args.device)}, {args.rounds} rounds")
    print(f"median: diffusers {statistics.median(theirs):.2f} s, vaepar {statistics.median(ours):.2f} s; "
          f"best: diffusers {min(theirs):.2f} s, vaepar {min(ours):.2f} s")
    print(f"vaepar / diffusers per round: median {statistics.median(ratios):.3f}, "
          f"best-to-best {min(ours) / min(theirs):.3f}")
    w.close()


if __name__ == "__main__":
    main()
