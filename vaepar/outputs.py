"""Writing results: PNG, MP4 and safetensors, always to a temporary file renamed into place."""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
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


def pixel_bytes(x: torch.Tensor) -> torch.Tensor:
    """Samples in [-1, 1] to uint8 as diffusers' postprocess (rounded), elementwise: on ``x``'s
    device and in its layout, so that each rank can convert its own part of a result."""
    y = x.detach().float() / 2  # a new tensor: the steps below work in place, one float copy at a time
    return y.add_(0.5).clamp_(0, 1).mul_(255).round_().to(torch.uint8)


def wants_pixels(path: Path) -> bool:
    """Whether the output format of ``path`` stores uint8 pixels (PNG, MP4) rather than floats."""
    return path.suffix.lower() in (".png", ".mp4")


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """Images ``(B, 3, H, W)`` or videos ``(B, 3, F, H, W)`` in [-1, 1] (or already
    :func:`pixel_bytes`) to channels-last uint8, ``(B, H, W, 3)`` or ``(B, F, H, W, 3)``.

    The channel axis is dim 1 in both layouts (for a video, dim -3 is the frame axis).
    """
    pixels = x if x.dtype == torch.uint8 else pixel_bytes(x.detach().float().cpu())
    return np.ascontiguousarray(pixels.movedim(1, -1).cpu().numpy())


def numbered(path: Path, count: int, index: int, width: int = 0) -> Path:
    """``name.png`` for a single item, else ``name_<index>.png`` (zero-padded to ``width``)."""
    if count == 1 and width == 0:
        return path
    return path.with_name(f"{path.stem}_{index:0{width}d}{path.suffix}")


def image_paths(path: Path, batch: int) -> list[Path]:
    """The PNG files written for a batch of images."""
    return [numbered(path, batch, b) for b in range(batch)]


def write_sample(path: Path, sample: torch.Tensor, *, fps: int = 16, quality: int = 8) -> list[Path]:
    """Write a decoded sample ``(B, 3, H, W)`` or ``(B, 3, F, H, W)`` in the format of its suffix
    (PNG and MP4 also take it as :func:`pixel_bytes`)."""
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        assert sample.is_floating_point(), "safetensors output keeps the float sample, not pixels"

        return _write(path, [path], lambda tmp: save_file(
            {"sample": sample.detach().float().cpu().contiguous()}, str(tmp[0])))
    if suffix == ".png":
        return _write_pngs(path, sample)
    if suffix == ".mp4":
        return _write_mp4s(path, sample, fps=fps, quality=quality)
    raise VaeparError(f"{path}: unsupported output format '{path.suffix}'")


def write_latents(path: Path, z: torch.Tensor, metadata: dict[str, str]) -> Path:
    """Write latents (float32, key ``latents``) with string metadata."""
    from safetensors.torch import save_file

    tensor = {"latents": z.detach().float().cpu().contiguous()}
    _write(path, [path], lambda tmp: save_file(tensor, str(tmp[0]), metadata=metadata))
    return path


def _write(path: Path, paths: list[Path], fill: Callable[[list[Path]], None]) -> list[Path]:
    """``fill`` the temporary siblings of ``paths``, then rename them into place; an OS error
    (a folder gone or read-only, a full disk) is one line naming ``path``."""
    try:
        with _staged(paths) as temps:
            fill(temps)
    except OSError as exc:
        raise VaeparError(f"{path}: cannot write the output ({exc.strerror or exc})") from None
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


def mp4_crf(quality: float) -> int:
    """x264 CRF for ``--quality`` 0 (worst) to 10 (best): imageio-ffmpeg's mapping, extended to 0."""
    return int((1 - quality / 10) * 51)


def _write_mp4s(path: Path, sample: torch.Tensor, *, fps: int, quality: float) -> list[Path]:
    if sample.ndim != 5:
        raise VaeparError(f"{path}: MP4 output needs a video model; use .png or .safetensors for images")
    if not 0 <= quality <= 10:
        raise VaeparError(f"{path}: MP4 quality must be between 0 and 10, got {quality}")
    if fps <= 0:
        raise VaeparError(f"{path}: MP4 frame rate must be positive, got {fps}")
    pixels = to_uint8(sample)  # (B, F, H, W, 3)
    paths = image_paths(path, pixels.shape[0])

    def fill(temps: list[Path]) -> None:
        for final, tmp, video in zip(paths, temps, pixels):
            _encode_h264(final, tmp, video, fps=fps, crf=mp4_crf(quality))

    return _write(path, paths, fill)


def _encode_h264(final: Path, tmp: Path, video: np.ndarray, *, fps: int, crf: int) -> None:
    """Frames ``(F, H, W, 3)`` uint8 to an H.264/yuv420p MP4 with imageio-ffmpeg's ffmpeg.

    Runs ffmpeg directly (the arguments imageio's FFMPEG writer uses) so that a failing ffmpeg
    is an error: imageio-ffmpeg ignores ffmpeg's exit status and can leave an empty file behind.
    """
    import subprocess
    from fractions import Fraction

    import imageio_ffmpeg

    _, h, w, _ = video.shape
    cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-v", "error",
           "-f", "rawvideo", "-vcodec", "rawvideo", "-s", f"{w}x{h}", "-pix_fmt", "rgb24",
           "-r", str(Fraction(fps).limit_denominator()), "-i", "-", "-an",
           "-vcodec", "libx264", "-pix_fmt", "yuv420p", "-crf", str(crf), "-f", "mp4", str(tmp)]
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=log)
        assert proc.stdin is not None
        try:
            try:
                for frame in video:
                    proc.stdin.write(np.ascontiguousarray(frame).tobytes())
            finally:
                with suppress(BrokenPipeError):  # ffmpeg quit early: its status and log say why
                    proc.stdin.close()
            code = proc.wait()
        except BrokenPipeError:
            code = proc.wait()
        finally:
            if proc.poll() is None:  # interrupted: do not leave ffmpeg behind
                proc.kill()
                proc.wait()
        if code != 0:
            log.seek(0)
            lines = log.read().decode(errors="replace").strip().splitlines()
            # the first line names the cause; drop ffmpeg's "[component @ 0x...]" prefixes
            why = re.sub(r"^(\[[^\]]*\]\s*)+", "", lines[0]).strip() if lines else f"exit status {code}"
            raise VaeparError(f"{final}: ffmpeg could not write the video ({why})")


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
