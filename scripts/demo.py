"""`make demo`: vaepar's main job on real content, offline, with the `tiny` VAE shipped in the package.

Encodes a photograph the tiny VAE never saw in training (vaepar/samples/chelsea_256.png), then decodes
the latents with 2 workers using each strategy, writes the PNGs to out/demo/ and prints how far each
is from the photograph and from the untiled decode.
"""

from __future__ import annotations

import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
PHOTO = ROOT / "vaepar" / "samples" / "chelsea_256.png"
OUT = Path("out/demo")
# Tiles of 128 px (16 latent rows) make the 256 px picture a 3x3 grid, so seams would show.
TILE = ["--tile-size", "128"]


def vaepar(*args: str) -> float:
    """Run one vaepar command as a user would; return its wall time."""
    cmd = [sys.executable, "-m", "vaepar", *args, "--model", "tiny", "--device", "cpu", "--quiet"]
    print("$ vaepar", " ".join(cmd[3:]), flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, check=True)
    return time.perf_counter() - start


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.float64)


def psnr(a: np.ndarray, b: np.ndarray) -> str:
    mse = float(np.mean((a - b) ** 2))
    return "identical" if mse == 0 else f"{10 * math.log10(255.0**2 / mse):.2f} dB"


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    latents = OUT / "chelsea.safetensors"
    vaepar("encode", str(PHOTO), "--out", str(latents))
    runs = [("none", 1, []), ("tiled", 2, TILE), ("patch", 2, []), ("shard", 2, [])]
    seconds = {}
    for strategy, nproc, extra in runs:
        out = OUT / f"{strategy}.png"
        seconds[strategy] = vaepar("decode", str(latents), "--out", str(out), "--strategy", strategy,
                                   "--nproc", str(nproc), *extra)
    photo, untiled = pixels(PHOTO), pixels(OUT / "none.png")
    table = Table(title=f"tiny VAE: {PHOTO.name} (held out from training) -> 32x32x16 latents -> "
                        f"{OUT}/<strategy>.png")
    for col in ("strategy", "workers", "PSNR vs photo", "PSNR vs untiled", "max |diff| (levels)", "wall s"):
        table.add_column(col, justify="left" if col == "strategy" else "right")
    for strategy, nproc, _ in runs:
        img = pixels(OUT / f"{strategy}.png")
        table.add_row(strategy, str(nproc), psnr(img, photo), psnr(img, untiled),
                      f"{np.abs(img - untiled).max():.0f}", f"{seconds[strategy]:.1f}")
    Console().print(table)
    print("wall s includes starting Python, torch and diffusers in each worker.")


if __name__ == "__main__":
    main()
