"""`make demo`: decode latents with 1 and 2 workers on an embedded model, no download needed.

Builds a small random-weight AutoencoderKL (the SD architecture, narrower), saves it as a diffusers
folder, writes latents, decodes them with `vaepar decode` untiled and tiled on 1 and 2 workers,
and checks the tiled results against diffusers' own tiled decode.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from safetensors.torch import load_file, save_file

from vaepar.outputs import write_sample

OUT = Path("out/demo")


def build_model(path: Path) -> None:
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(32, 64, 64, 64), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, norm_num_groups=16,
                        sample_size=256, layers_per_block=1)
    vae.save_pretrained(path)


def reference(model: Path, z: torch.Tensor) -> torch.Tensor:
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(model).eval()
    vae.enable_tiling()
    with torch.no_grad():
        return vae.decode(z / vae.config.scaling_factor).sample


def decode(model: Path, latents: Path, out: Path, strategy: str, nproc: int) -> None:
    cmd = [sys.executable, "-m", "vaepar", "decode", str(latents), "--model", str(model), "--out", str(out),
           "--strategy", strategy, "--nproc", str(nproc), "--device", "cpu", "--threads", "1", "--quiet"]
    print("$", " ".join(cmd[2:]), flush=True)
    subprocess.run(cmd, check=True)


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    model, latents = OUT / "model", OUT / "latents.safetensors"
    if not (model / "config.json").exists():
        build_model(model)
    g = torch.Generator().manual_seed(0)
    z = torch.nn.functional.interpolate(torch.randn(1, 4, 12, 16, generator=g), size=(48, 64), mode="bilinear")
    save_file({"latents": z * 0.18215}, str(latents))
    torch.set_num_threads(1)
    want = reference(model, z * 0.18215)
    table = Table(title="vaepar decode, 384x512 from a 48x64 latent (random-weight demo VAE)")
    for col in ("strategy", "workers", "output", "max |x - diffusers tiled|"):
        table.add_column(col)
    for strategy, nproc in (("none", 1), ("tiled", 1), ("tiled", 2)):
        out = OUT / f"{strategy}_{nproc}.safetensors"
        decode(model, latents, out, strategy, nproc)
        got = load_file(out)["sample"]
        write_sample(out.with_suffix(".png"), got)
        err = (got - want).abs().max().item() if strategy == "tiled" else float("nan")
        table.add_row(strategy, str(nproc), str(out.with_suffix(".png")), "-" if strategy == "none" else f"{err:g}")
    Console().print(table)


if __name__ == "__main__":
    main()
