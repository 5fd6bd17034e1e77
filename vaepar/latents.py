"""The latent file format: read, validate, unpack and unscale latents (no distributed code).

A latent file is a safetensors file holding one tensor named ``latents`` (or exactly one tensor of
any name): image latents ``(B, C, H, W)``, packed Flux latents ``(B, N, 4C)``, or video latents
``(B, C, F, H, W)``. Optional string metadata: ``model``, ``height``, ``width`` (pixels, needed to
unpack Flux latents), ``scaled`` (``"true"``/``"false"``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import torch

from vaepar.errors import OptionError, VaeparError
from vaepar.vae import ModelSpec

KEY = "latents"


@dataclass(frozen=True, kw_only=True, slots=True)
class LatentFile:
    """A validated latent tensor with the file's metadata."""

    path: Path
    tensor: torch.Tensor
    metadata: dict[str, str]


def read(path: Path, key: str = KEY) -> tuple[torch.Tensor, dict[str, str]]:
    """The tensor named ``key`` (or the only tensor) of a safetensors file, and its metadata."""
    from safetensors import SafetensorError, safe_open

    if path.is_dir():
        raise VaeparError(f"{path}: is a folder, expected a .safetensors latent file")
    if not path.is_file():
        raise VaeparError(f"{path}: no such file")
    try:
        with safe_open(str(path), framework="pt") as f:
            keys, metadata = list(f.keys()), f.metadata() or {}
            if key in keys:
                name = key
            elif len(keys) == 1:
                name = keys[0]
            else:
                found = ", ".join(keys[:8]) or "none"
                raise VaeparError(f"{path}: expected a tensor named '{key}' or a single tensor, found: {found}")
            return f.get_tensor(name), dict(metadata)
    except (SafetensorError, OSError, ValueError) as exc:
        raise VaeparError(f"{path}: not a readable safetensors file ({exc})") from None


def load(path: Path, spec: ModelSpec, *, height: int | None = None, width: int | None = None) -> LatentFile:
    """Read a latent file and check it against the model: rank, channels, finite values."""
    tensor, meta = read(path)
    if not tensor.is_floating_point():
        raise VaeparError(f"{path}: latents must be floating point, got {tensor.dtype}")
    if spec.is_video and (height is not None or width is not None):
        raise OptionError(f"{path}: --height/--width unpack packed image latents; leave them out for video")
    packed = not spec.is_video and tensor.ndim == 3
    if packed:
        tensor = unpack(path, tensor, spec, height or _int(meta, "height", path), width or _int(meta, "width", path))
    elif spec.family.frame_axis and tensor.ndim == 5 and tensor.shape[2] == 1:
        tensor = tensor[:, :, 0]
    if not packed and (height is not None or width is not None):
        raise OptionError(f"{path}: --height/--width unpack packed latents (B, N, 4C), but this file "
                          f"holds {tuple(tensor.shape)}; leave them out")
    check_latents(path, tensor, spec)
    _check_finite(path, tensor)
    return LatentFile(path=path, tensor=tensor, metadata=meta)


def check_latents(path: Path, tensor: torch.Tensor, spec: ModelSpec) -> None:
    """Refuse latents whose rank or channel count does not fit the model (``path`` names them)."""
    if spec.is_video:
        _check_video(path, tensor, spec)
    else:
        _check_image(path, tensor, spec)


def nonfinite(t: torch.Tensor) -> str | None:
    """How many NaN and Inf values ``t`` holds (``"1 NaN, 2 Inf"``), or None if all are finite."""
    return describe_nonfinite(*nonfinite_counts(t))


def nonfinite_counts(t: torch.Tensor) -> tuple[int, int]:
    """The NaN and Inf values in ``t``."""
    if torch.isfinite(t).all():
        return 0, 0
    return int(torch.isnan(t).sum()), int(torch.isinf(t).sum())


def describe_nonfinite(nan: int, inf: int) -> str | None:
    """``"1 NaN, 2 Inf"``, or None for none."""
    return ", ".join(f"{n} {kind}" for n, kind in ((nan, "NaN"), (inf, "Inf")) if n) or None


def _check_finite(path: Path, t: torch.Tensor) -> None:
    if (found := nonfinite(t)) is not None:
        raise VaeparError(f"{path}: latents contain non-finite values ({found}), expected finite numbers")


def _check_image(path: Path, t: torch.Tensor, spec: ModelSpec) -> None:
    if t.ndim == 5:
        raise VaeparError(f"{path}: video latents (B, C, F, H, W) {tuple(t.shape)} given to the image "
                          f"VAE {spec.class_name} ('{spec.name}'); use a video model")
    if t.ndim != 4:
        raise VaeparError(f"{path}: expected image latents (B, C, H, W) or packed (B, N, 4C), "
                          f"got shape {tuple(t.shape)}")
    _check_channels(path, t, spec)


def _check_video(path: Path, t: torch.Tensor, spec: ModelSpec) -> None:
    if t.ndim == 4:
        raise VaeparError(f"{path}: image latents (B, C, H, W) {tuple(t.shape)} given to the video "
                          f"VAE {spec.class_name} ('{spec.name}'); expected (B, C, F, H, W)")
    if t.ndim != 5:
        raise VaeparError(f"{path}: expected video latents (B, C, F, H, W), got shape {tuple(t.shape)}")
    if t.shape[2] == 0:
        raise VaeparError(f"{path}: video latents have zero frames")
    _check_channels(path, t, spec)


def _check_channels(path: Path, t: torch.Tensor, spec: ModelSpec) -> None:
    if t.shape[1] != spec.latent_channels:
        raise VaeparError(f"{path}: latents have {t.shape[1]} channels, model '{spec.name}' expects "
                          f"{spec.latent_channels}")
    if 0 in t.shape:
        raise VaeparError(f"{path}: latents are empty, shape {tuple(t.shape)}")


def _int(meta: dict[str, str], key: str, path: Path) -> int:
    if key not in meta:
        raise VaeparError(f"{path}: packed latents need --height/--width or '{key}' in the file's metadata")
    try:
        return int(meta[key])
    except ValueError:
        raise VaeparError(f"{path}: metadata '{key}' is not an integer: {meta[key]!r}") from None


def unpack(path: Path, t: torch.Tensor, spec: ModelSpec, height: int, width: int) -> torch.Tensor:
    """Unpack Flux latents ``(B, (h/2)(w/2), 4C)`` to ``(B, C, h, w)`` for an image of height x width."""
    h, w = 2 * (height // (spec.scale * 2)), 2 * (width // (spec.scale * 2))
    b, n, c4 = t.shape
    if n != (h // 2) * (w // 2) or c4 % 4:
        raise VaeparError(f"{path}: packed latents {tuple(t.shape)} do not fit a {height}x{width} image "
                          f"(expected (B, {(h // 2) * (w // 2)}, 4C))")
    return t.view(b, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c4 // 4, h, w)


@functools.lru_cache(maxsize=16)
def _factors(spec: ModelSpec, scaling: float | None, shift: float | None) -> Factors:
    return spec.family.factors(spec, scaling, shift)


@dataclass(frozen=True, kw_only=True, slots=True)
class Factors:
    """How pipelines scale latents, computed as they compute it: KL ``z / scaling + shift``; per
    channel (Wan) ``z / (1 / std) + mean``; per 2x2 patch channel (``patch`` 2, FLUX.2's BatchNorm
    statistics, ``4C`` values in ``(c, dy, dx)`` order) ``z * std + mean``."""

    scaling: float | None = None
    shift: float | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    patch: int = 1

    @staticmethod
    def of(spec: ModelSpec, scaling: float | None = None, shift: float | None = None) -> Factors:
        """The model family's pipeline factors (``scaling``/``shift``: user overrides); computed
        once per model (FLUX.2's come from its weights)."""
        return _factors(spec, scaling, shift)

    def scale(self, z: torch.Tensor) -> torch.Tensor:
        """Latents as pipelines store them: the inverse of :meth:`unscale`."""
        if self.patch > 1:
            mean, std = self._per_patch(z)
            return (z - mean) / std
        if self.mean is not None and self.std is not None:
            mean, inv_std = self._per_channel(z)
            return (z - mean) * inv_std
        z = z - self.shift if self.shift is not None else z
        return z * self.scaling if self.scaling is not None else z

    def _per_channel(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.mean is not None and self.std is not None
        shape = (1, len(self.mean)) + (1,) * (z.ndim - 2)
        mean = torch.tensor(self.mean).view(shape).to(z.device, z.dtype)
        inv_std = 1.0 / torch.tensor(self.std).view(shape).to(z.device, z.dtype)
        return mean, inv_std

    def _per_patch(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and std maps over ``z`` (B, C, H, W): latent (y, x) of channel c takes patch
        channel (c, y % p, x % p)."""
        assert self.mean is not None and self.std is not None
        p, (c, h, w) = self.patch, z.shape[-3:]
        if h % p or w % p or len(self.mean) != c * p * p:
            raise VaeparError(f"latents {tuple(z.shape)} do not fit {p}x{p} patch statistics of "
                              f"{len(self.mean)} channels")

        def tiled(values: tuple[float, ...]) -> torch.Tensor:
            return torch.tensor(values).view(1, c, p, p).repeat(1, 1, h // p, w // p).to(z.device, z.dtype)

        return tiled(self.mean), tiled(self.std)

    def unscale(self, z: torch.Tensor) -> torch.Tensor:
        """Latents as the pipeline hands them to ``vae.decode``."""
        if self.patch > 1:
            mean, std = self._per_patch(z)
            return z * std + mean
        if self.mean is not None and self.std is not None:
            mean, inv_std = self._per_channel(z)
            return z / inv_std + mean
        z = z / self.scaling if self.scaling is not None else z
        return z + self.shift if self.shift is not None else z
