"""Models: finding a VAE (local folder, hub id, preset), loading it, and running one tile of it.

Resolution (:func:`resolve`) reads only the VAE's ``config.json`` so the launcher can validate
inputs before any worker starts; :func:`load` brings the weights in a worker. A :class:`Family`
wraps a loaded diffusers VAE and knows its geometry and how diffusers runs one tile.
"""

from __future__ import annotations

import json
import os
import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from vaepar import plan
from vaepar.errors import VaeparError

Tick = Callable[[int], None]
PACKAGE_DIR = Path(__file__).resolve().parent
SUPPORTED = ("AutoencoderKL", "AutoencoderKLWan")
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def presets() -> dict[str, dict[str, Any]]:
    """The named models of ``configs/presets.toml`` (the checkout's, else the installed copy)."""
    return tomllib.loads(_config_file("presets.toml").read_text())


@dataclass(frozen=True, kw_only=True, slots=True)
class ModelSpec:
    """Where a VAE lives and what its config says; cheap to pickle to workers."""

    name: str
    source: str
    subfolder: str
    local: bool
    config: dict[str, Any] = field(hash=False)
    overrides: dict[str, Any] = field(default_factory=dict, hash=False)
    random_weights: bool = False
    preset: bool = False

    @property
    def class_name(self) -> str:
        return self.config["_class_name"]

    @property
    def is_video(self) -> bool:
        return self.class_name == "AutoencoderKLWan"

    @property
    def latent_channels(self) -> int:
        return int(self.config["z_dim"] if self.is_video else self.config.get("latent_channels", 4))

    @property
    def scale(self) -> int:
        """Spatial compression, pixels per latent."""
        if self.is_video:
            return int(self.config.get("scale_factor_spatial") or 8)
        return 2 ** (len(self.config.get("block_out_channels", (64,))) - 1)

    @property
    def packed(self) -> bool:
        return bool(self.overrides.get("packed", False))

    def factor(self, key: str) -> Any:
        """A latent factor (scaling/shift/mean/std): preset override, else the config's."""
        return self.overrides.get(key, self.config.get(key))


def architecture(name: str) -> ModelSpec:
    """A model architecture from ``configs/architectures/NAME.json``, with random weights (for
    benchmarks: timing does not depend on weights)."""
    config = json.loads(_config_file("architectures", f"{name}.json").read_text())
    return ModelSpec(name=f"{name} (random weights)", source="", subfolder="", local=True, config=config,
                     random_weights=True)


def _config_file(*parts: str) -> Path:
    source = Path(__file__).resolve().parent.parent / "configs"
    if source.is_dir():
        return source.joinpath(*parts)
    return Path(str(resources.files("vaepar.configs").joinpath(*parts)))


def resolve(name: str, subfolder: str | None = None) -> ModelSpec:
    """Find a model by local folder, preset name or hub id, reading only its config."""
    path = Path(name).expanduser()
    if path.exists():
        return _local(name, path, subfolder, {})
    table = presets()
    if name in table:
        entry = dict(table[name])
        sub = entry.pop("subfolder", None)
        sub = sub if subfolder is None else subfolder
        if "path" in entry:  # shipped inside the package
            spec = _local(name, PACKAGE_DIR / entry.pop("path"), sub, entry)
        else:
            spec = _hub(name, entry.pop("repo"), sub, entry)
        return replace(spec, preset=True)
    if _HUB_ID.match(name) and not name.startswith("."):
        return _hub(name, name, subfolder, {})
    if _looks_like_path(name):
        raise VaeparError(f"model folder {name} does not exist")
    raise VaeparError(
        f"unknown model '{name}': not a folder, not a preset ({', '.join(sorted(table))}) "
        "and not a hub id (org/name)"
    )


def _looks_like_path(name: str) -> bool:
    """A name a user meant as a folder: has a separator or starts with '.', '/' or '~'."""
    return name.startswith((".", "/", "~")) or "/" in name or os.sep in name


def _local(name: str, root: Path, subfolder: str | None, overrides: dict[str, Any]) -> ModelSpec:
    if not root.is_dir():
        raise VaeparError(f"model '{name}': {root} is not a folder")
    candidates = [subfolder] if subfolder is not None else ["", "vae"]
    for sub in candidates:
        cfg = root / sub / "config.json"
        if cfg.is_file():
            config = _read_config(cfg, name)
            return ModelSpec(name=name, source=str(root), subfolder=sub, local=True,
                             config=config, overrides=overrides)
    where = " or ".join(str(root / s / "config.json") for s in candidates)
    raise VaeparError(f"model '{name}': no diffusers config found (looked for {where})")


def _hub(name: str, repo: str, subfolder: str | None, overrides: dict[str, Any]) -> ModelSpec:
    from huggingface_hub import hf_hub_download

    import logging

    logging.getLogger("huggingface_hub").setLevel(logging.ERROR)  # no retry chatter
    candidates = [subfolder] if subfolder is not None else ["vae", ""]
    errors = []
    for sub in candidates:
        try:
            cfg = hf_hub_download(repo, "config.json", subfolder=sub or None)
        except Exception as exc:  # the hub client raises many types; all mean "not there"
            errors.append(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
            continue
        config = _read_config(Path(cfg), name)
        return ModelSpec(name=name, source=repo, subfolder=sub, local=False,
                         config=config, overrides=overrides)
    raise VaeparError(f"model '{name}': cannot fetch '{repo}' from the hub ({errors[-1]})")


def _read_config(path: Path, name: str) -> dict[str, Any]:
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise VaeparError(f"model '{name}': cannot read {path}: {exc}") from None
    cls = config.get("_class_name") if isinstance(config, dict) else None
    if cls not in SUPPORTED:
        raise VaeparError(
            f"model '{name}': {path} describes a {cls or 'non-diffusers model'}; "
            f"supported: {', '.join(SUPPORTED)}"
        )
    return config


def load(spec: ModelSpec, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """Load the VAE's weights, in eval mode, on ``device`` in ``dtype``."""
    import diffusers

    cls = getattr(diffusers, spec.class_name)
    if spec.random_weights:
        torch.manual_seed(0)
        vae = cls.from_config(spec.config)
        # nn.Module.to: diffusers' own .to warns about float32 modules this architecture lacks.
        return torch.nn.Module.to(vae, device=device, dtype=dtype).eval().requires_grad_(False)
    try:
        vae = cls.from_pretrained(spec.source, subfolder=spec.subfolder or None, torch_dtype=dtype,
                                  use_safetensors=True)  # never unpickle weights
    except Exception as exc:  # from_pretrained raises OSError, ValueError, hub errors...
        raise VaeparError(f"model '{spec.name}': cannot load weights: {exc}") from None
    return vae.to(device).eval().requires_grad_(False)


def model_reference(spec: ModelSpec) -> str:
    """How a latent file names its model so that decode finds it again: a local folder by its
    absolute path (even one named like a preset), a preset or hub id by name."""
    if spec.local and not spec.preset:
        return str(Path(spec.source).resolve())
    return spec.name


def patchify(spec: ModelSpec, x: torch.Tensor) -> torch.Tensor:
    """Pixels as Wan 2.2's encoder sees them (patch_size > 1), else unchanged."""
    from diffusers.models.autoencoders.autoencoder_kl_wan import patchify as wan_patchify

    p = patch_size(spec)
    return wan_patchify(x, patch_size=p) if p > 1 else x


def default_tile(spec: ModelSpec) -> int:
    """The model's own tile size in pixels: ``sample_size`` for KL, 256 for Wan (as diffusers)."""
    if spec.is_video:
        return 256
    size = spec.config.get("sample_size", 512)
    return int(size[0] if isinstance(size, (list, tuple)) else size)


def patch_size(spec: ModelSpec) -> int:
    return int(spec.config.get("patch_size") or 1) if spec.is_video else 1


def decode_grid(spec: ModelSpec, h: int, w: int, tile: int | None, overlap: float) -> plan.Grid:
    """diffusers' decode tiles for a latent of ``h`` x ``w`` (untiled when ``tile`` is None)."""
    s, p = spec.scale, patch_size(spec)
    if tile is None:
        return plan.Grid(rows=plan.single(h, h * s // p), cols=plan.single(w, w * s // p))
    if not spec.is_video:
        return plan.kl_decode_grid(h, w, tile=tile, overlap=overlap, scale=s)
    if h <= tile // s and w <= tile // s:
        return decode_grid(spec, h, w, None, overlap)
    stride = int(tile * (1 - overlap))
    ax = dict(tile=tile // s, stride=stride // s, up=s // p, down=1,
              blend=tile // p - stride // p, crop=stride // p)
    return plan.Grid(rows=plan.tiled_axis(h, **ax, limit=h * s // p),
                     cols=plan.tiled_axis(w, **ax, limit=w * s // p))


def encode_grid(spec: ModelSpec, h: int, w: int, tile: int | None, overlap: float) -> plan.Grid:
    """diffusers' encode tiles over pixels ``h`` x ``w`` as the encoder sees them (Wan 2.2:
    patchified), untiled when ``tile`` is None."""
    p = patch_size(spec)
    s = spec.scale // p
    if tile is None:
        return plan.Grid(rows=plan.single(h, h // s), cols=plan.single(w, w // s))
    if not spec.is_video:
        return plan.kl_encode_grid(h, w, tile=tile, overlap=overlap, scale=s)
    if h * p <= tile and w * p <= tile:  # diffusers compares the size before patchifying
        return encode_grid(spec, h, w, None, overlap)
    stride = int(tile * (1 - overlap))
    ax = dict(tile=tile, stride=stride, up=1, down=s, blend=tile // s - stride // s, crop=stride // s)
    return plan.Grid(rows=plan.tiled_axis(h, **ax, limit=h // s), cols=plan.tiled_axis(w, **ax, limit=w // s))


def _no_tick(n: int) -> None:
    pass


class Family:
    """How diffusers runs one tile of a loaded VAE."""

    def __init__(self, vae: torch.nn.Module, spec: ModelSpec) -> None:
        self.vae, self.spec = vae, spec

    @staticmethod
    def of(vae: torch.nn.Module, spec: ModelSpec) -> Family:
        return WanFamily(vae, spec) if spec.is_video else KLFamily(vae, spec)

    def decode_tile(self, z: torch.Tensor, *, tiled: bool, tick: Tick = _no_tick) -> torch.Tensor:
        """Raw decoder output for one tile (or the whole latent when ``tiled`` is False)."""
        raise NotImplementedError

    def finish_decode(self, x: torch.Tensor) -> torch.Tensor:
        """Post-processing after the merge (Wan: unpatchify and clamp)."""
        return x

    def prepare_encode(self, x: torch.Tensor) -> torch.Tensor:
        """Pixels as the encoder's tiles slice them (Wan 2.2: patchified)."""
        return patchify(self.spec, x)

    def steps(self, x: torch.Tensor, task: str) -> int:
        """Progress units per tile: 1 for images; frames (decode) or time chunks (encode) for video."""
        if x.ndim != 5:
            return 1
        return x.shape[2] if task == "decode" else 1 + (x.shape[2] - 1) // 4

    def encode_tile(self, x: torch.Tensor, *, tiled: bool, tick: Tick = _no_tick) -> torch.Tensor:
        """Latent moments (mean and log-variance) of one tile, or of all pixels when not ``tiled``."""
        raise NotImplementedError

    @staticmethod
    def latents(moments: torch.Tensor, *, sample: bool, seed: int | None) -> torch.Tensor:
        """The posterior's mode, or a sample drawn with ``seed``."""
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        posterior = DiagonalGaussianDistribution(moments)
        if not sample:
            return posterior.mode()
        generator = torch.Generator(moments.device)
        generator.manual_seed(seed if seed is not None else 0)
        return posterior.sample(generator)


class KLFamily(Family):
    """``AutoencoderKL`` (SD 1.x/2.x, SDXL, SD3, Flux)."""

    def decode_tile(self, z: torch.Tensor, *, tiled: bool, tick: Tick = _no_tick) -> torch.Tensor:
        if self.vae.config.use_post_quant_conv:
            z = self.vae.post_quant_conv(z)
        out = self.vae.decoder(z)
        tick(1)
        return out

    def encode_tile(self, x: torch.Tensor, *, tiled: bool, tick: Tick = _no_tick) -> torch.Tensor:
        h = self.vae.encoder(x)
        if self.vae.config.use_quant_conv:
            h = self.vae.quant_conv(h)
        tick(1)
        return h


class WanFamily(Family):
    """``AutoencoderKLWan`` (Wan 2.1; Wan 2.2 with ``patch_size``), causal in time."""

    def decode_tile(self, z: torch.Tensor, *, tiled: bool, tick: Tick = _no_tick) -> torch.Tensor:
        vae = self.vae
        vae.clear_cache()
        x = z if tiled else vae.post_quant_conv(z)
        frames = []
        for k in range(z.shape[2]):
            vae._conv_idx = [0]
            step = x[:, :, k : k + 1]
            if tiled:
                step = vae.post_quant_conv(step)
            frames.append(vae.decoder(step, feat_cache=vae._feat_map, feat_idx=vae._conv_idx,
                                      first_chunk=(k == 0)))
            tick(1)
        vae.clear_cache()
        return torch.cat(frames, dim=2)

    def encode_tile(self, x: torch.Tensor, *, tiled: bool, tick: Tick = _no_tick) -> torch.Tensor:
        """Causal in time: the first frame alone, then chunks of 4, through one cache."""
        vae = self.vae
        vae.clear_cache()
        chunks = []
        for k in range(1 + (x.shape[2] - 1) // 4):
            vae._enc_conv_idx = [0]
            step = x[:, :, :1] if k == 0 else x[:, :, 1 + 4 * (k - 1) : 1 + 4 * k]
            out = vae.encoder(step, feat_cache=vae._enc_feat_map, feat_idx=vae._enc_conv_idx)
            chunks.append(vae.quant_conv(out) if tiled else out)
            tick(1)
        vae.clear_cache()
        moments = torch.cat(chunks, dim=2)
        return moments if tiled else vae.quant_conv(moments)

    def finish_decode(self, x: torch.Tensor) -> torch.Tensor:
        from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify

        p = patch_size(self.spec)
        if p > 1:
            x = unpatchify(x, patch_size=p)
        return torch.clamp(x, min=-1.0, max=1.0)
