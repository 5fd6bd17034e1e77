"""Writing results: PNG, MP4 and safetensors, always to a temporary file renamed into place."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from vaepar.errors import VaeparError

IMAGE_SUFFIXES = (".png", ".safetensors")
VIDEO_SUFFIXES = (".mp4", ".safetensors", ".png")


@contextmanager
def _staged(paths: list[Path]) -> Iterator[list[Path]]:
    """Temporary siblings of ``paths``; renamed onto them only if the block succeeds."""
    temps = []
    try:
        for p in paths:
            fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=p.suffix, dir=p.parent)
            os.close(fd)
            temps.append(Path(tmp))
        yield temps
        for tmp, p in zip(temps, paths):
            os.replace(tmp, p)
    finally:
        for tmp in temps:
            tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with _staged([path]) as (tmp,):
        tmp.write_bytes(data)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """``(..., 3, H, W)`` in [-1, 1] to ``(..., H, W, 3)`` uint8, as diffusers' postprocess."""
    x = (x.detach().float().cpu() / 2 + 0.5).clamp(0, 1)
    x = x.movedim(-3, -1).numpy()
    return (x * 255).round().astype("uint8")


def numbered(path: Path, count: int, index: int, width: int = 0) -> Path:
    """``name.png`` for a single item, else ``name_<index>.png`` (zero-padded to ``width``)."""
    if count == 1 and width == 0:
        return path
    return path.with_name(f"{path.stem}_{index:0{width}d}{path.suffix}")


def image_paths(path: Path, batch: int) -> list[Path]:
    """The PNG files written for a batch of images."""
    return [numbered(path, batch, b) for b in range(batch)]


def write_sample(path: Path, sample: torch.Tensor, *, fps: int = 16, quality: int = 8) -> list[Path]:
    """Write a decoded sample ``(B, 3, H, W)`` or ``(B, 3, F, H, W)`` in the format of its suffix."""
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        return _write(path, [path], lambda tmp: save_file(
            {"sample": sample.detach().float().cpu().contiguous()}, str(tmp[0])))
    if suffix == ".png":
        return _write_pngs(path, sample)
    if suffix == ".mp4":
        return _write_mp4s(path, sample, fps=fps, quality=quality)
    raise VaeparError(f"{path}: unsupported output format '{path.suffix}'")


def _write(path: Path, paths: list[Path], fill: Callable[[list[Path]], None]) -> list[Path]:
    with _staged(paths) as temps:
        fill(temps)
    return paths


def _write_pngs(path: Path, sample: torch.Tensor) -> list[Path]:
    from PIL import Image

    pixels = to_uint8(sample)
    if sample.ndim == 5:  # (B, 3, F, H, W) -> pixels (B, F, H, W, 3): one PNG per frame
        frames = [(b, f) for b in range(pixels.shape[0]) for f in range(pixels.shape[1])]
        batch_paths = image_paths(path, pixels.shape[0])
        paths = [numbered(batch_paths[b], 2, f, width=5) for b, f in frames]
        images = [pixels[b, f] for b, f in frames]
    else:
        paths, images = image_paths(path, pixels.shape[0]), list(pixels)

    def fill(temps: list[Path]) -> None:
        for tmp, img in zip(temps, images):
            Image.fromarray(img).save(tmp, format="PNG")

    return _write(path, paths, fill)


def _write_mp4s(path: Path, sample: torch.Tensor, *, fps: int, quality: int) -> list[Path]:
    import imageio.v2 as imageio

    if sample.ndim != 5:
        raise VaeparError(f"{path}: MP4 output needs a video model; use .png or .safetensors for images")
    pixels = to_uint8(sample)  # (B, F, H, W, 3)
    paths = image_paths(path, pixels.shape[0])

    def fill(temps: list[Path]) -> None:
        for tmp, video in zip(temps, pixels):
            with imageio.get_writer(tmp, format="FFMPEG", fps=fps, codec="libx264", quality=quality,
                                    pixelformat="yuv420p", macro_block_size=1) as w:
                for frame in video:
                    w.append_data(frame)

    return _write(path, paths, fill)


def check_writable(path: Path, suffixes: tuple[str, ...]) -> None:
    """Fail early, before any worker starts, if ``path`` cannot receive an output."""
    if path.suffix.lower() not in suffixes:
        raise VaeparError(f"{path}: unsupported output format '{path.suffix or '(none)'}'; "
                          f"expected one of {', '.join(suffixes)}")
    parent = path.parent
    if not parent.is_dir():
        what = "a file, not a folder" if parent.exists() else "not an existing folder"
        raise VaeparError(f"{path}: cannot write here, {parent} is {what}")
    if path.is_dir():
        raise VaeparError(f"{path}: is a folder; give a file name")
    if not os.access(parent, os.W_OK):
        raise VaeparError(f"{path}: folder {parent} is not writable")
