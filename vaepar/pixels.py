"""Pixel inputs for encode: images, MP4 videos and safetensors pixel tensors, mapped to [-1, 1].

Images become ``(1, 3, H, W)``, videos ``(1, 3, F, H, W)``, as diffusers' image and video
processors do: ``uint8 / 255`` in float32, then ``2 x - 1``. No distributed code here.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from vaepar.errors import OptionError, VaeparError
from vaepar.vae import ModelSpec

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".webm", ".avi")
FITS = ("crop", "resize")


def from_uint8(pixels: np.ndarray) -> torch.Tensor:
    """``(..., H, W, 3)`` uint8 to ``(..., 3, H, W)`` float32 in [-1, 1]."""
    x = torch.from_numpy(pixels.astype(np.float32) / 255.0)
    return 2.0 * x.movedim(-1, -3) - 1.0


def load(path: Path, *, frames: int | None = None) -> torch.Tensor:
    """Read an image, a video or a pixel tensor file as float32 in [-1, 1]."""
    if not path.is_file():
        raise VaeparError(f"{path}: no such file" if not path.exists() else f"{path}: is not a file")
    suffix = path.suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        return _image(path)
    if suffix in VIDEO_SUFFIXES:
        return _video(path, frames)
    if suffix == ".safetensors":
        return _tensor(path)
    raise VaeparError(f"{path}: unsupported input '{path.suffix}'; expected an image "
                      f"({', '.join(IMAGE_SUFFIXES)}), a video (.mp4, ...) or a .safetensors pixel tensor")


def _image(path: Path) -> torch.Tensor:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            rgb = np.asarray(img.convert("RGB"))
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise VaeparError(f"{path}: not a readable image ({exc})") from None
    return from_uint8(rgb)[None]


def _video(path: Path, frames: int | None) -> torch.Tensor:
    import imageio.v2 as imageio

    if frames is not None and frames < 1:
        raise VaeparError(f"--frames must be at least 1, got {frames}")
    try:
        with imageio.get_reader(path, format="FFMPEG") as reader:
            video = [frame for _, frame in zip(range(frames or 1 << 30), reader)]
    except (OSError, RuntimeError, ValueError) as exc:
        raise VaeparError(f"{path}: not a readable video ({str(exc).splitlines()[0] if str(exc) else exc})") from None
    if not video:
        raise VaeparError(f"{path}: the video has no frames")
    if frames is not None and len(video) < frames:
        raise VaeparError(f"{path}: asked for {frames} frames but the video has {len(video)}")
    return from_uint8(np.stack(video)).movedim(0, 1)[None]  # (F, 3, H, W) -> (1, 3, F, H, W)


def _tensor(path: Path) -> torch.Tensor:
    from vaepar.latents import read

    x, _ = read(path, key="sample")
    if not x.is_floating_point():
        raise VaeparError(f"{path}: pixel tensor must be floating point, got {x.dtype}")
    if x.ndim not in (4, 5) or x.shape[1] != 3:
        raise VaeparError(f"{path}: expected pixels (B, 3, H, W) or (B, 3, F, H, W), got shape {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise VaeparError(f"{path}: pixel tensor contains NaN or Inf")
    low, high = x.min().item(), x.max().item()
    if low < -1 or high > 1:
        raise VaeparError(f"{path}: pixel values must lie in [-1, 1], found [{low:.4g}, {high:.4g}]")
    return x.float()


def fit(path: Path, x: torch.Tensor, multiple: int, how: str | None) -> torch.Tensor:
    """Make H and W multiples of ``multiple``: refuse (None), centre-crop, or resize (``how`` is
    one of :data:`FITS`, as :func:`prepare` checked)."""
    h, w = x.shape[-2:]
    if h % multiple == 0 and w % multiple == 0:
        return x
    if how is None:
        raise VaeparError(f"{path}: size {h}x{w} is not a multiple of {multiple} (the model's scale); "
                          "pass --fit crop or --fit resize")
    nh, nw = (h // multiple) * multiple, (w // multiple) * multiple
    if how == "resize":
        nh, nw = max(multiple, round(h / multiple) * multiple), max(multiple, round(w / multiple) * multiple)
        flat = x.reshape(-1, *x.shape[-3:]) if x.ndim == 4 else x.movedim(2, 1).reshape(-1, 3, h, w)
        out = torch.nn.functional.interpolate(flat, size=(nh, nw), mode="bicubic", align_corners=False,
                                              antialias=True).clamp(-1, 1)
        return out if x.ndim == 4 else out.reshape(x.shape[0], x.shape[2], 3, nh, nw).movedim(1, 2)
    if nh == 0 or nw == 0:
        raise VaeparError(f"{path}: size {h}x{w} is smaller than one latent ({multiple} px)")
    top, left = (h - nh) // 2, (w - nw) // 2
    return x[..., top : top + nh, left : left + nw]


def prepare(path: Path, spec: ModelSpec, *, frames: int | None = None, how: str | None = None) -> torch.Tensor:
    """Read pixels and check them against the model: image vs video, frame count, size."""
    if frames is not None and path.suffix.lower() not in VIDEO_SUFFIXES:
        raise OptionError(f"{path}: --frames applies to video files ({', '.join(VIDEO_SUFFIXES)}), not to this input")
    if how is not None and how not in FITS:
        raise OptionError(f"--fit must be one of {', '.join(FITS)}, got {how!r}")
    x = load(path, frames=frames)
    if spec.is_video and x.ndim == 4:
        raise VaeparError(f"{path}: an image was given to the video VAE {spec.class_name} ('{spec.name}'); "
                          "expected a video (MP4, or pixels (B, 3, F, H, W))")
    if not spec.is_video and x.ndim == 5:
        raise VaeparError(f"{path}: a video was given to the image VAE {spec.class_name} ('{spec.name}'); "
                          "use a video model, or encode frames as images")
    t = spec.temporal
    if spec.is_video and (x.shape[2] - 1) % t:
        raise VaeparError(f"{path}: {x.shape[2]} frames; {spec.class_name} encodes 1 + {t}k frames "
                          f"(1, {1 + t}, {1 + 2 * t}, ...): pass --frames {1 + t * ((x.shape[2] - 1) // t)}")
    return fit(path, x, spec.scale, how)
