"""Models: finding a VAE (local folder, hub id, preset) and loading it.

Resolution (:func:`resolve`) reads only the VAE's ``config.json`` so the launcher can validate
inputs before any worker starts; :func:`load` brings the weights in a worker. What differs between
VAE classes is their family's (``spec.family``, :mod:`vaepar.families`).
"""

from __future__ import annotations

import json
import os
import re
import tomllib
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from vaepar import families
from vaepar.errors import VaeparError
from vaepar.families import SUPPORTED, Family

PACKAGE_DIR = Path(__file__).resolve().parent
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
    def family(self) -> type[Family]:
        """What the VAE's family declares (:mod:`vaepar.families`)."""
        return families.of(self.class_name)

    @property
    def is_video(self) -> bool:
        return self.family.video

    @property
    def latent_channels(self) -> int:
        return self.family.latent_channels(self.config)

    @property
    def scale(self) -> int:
        """Spatial compression, pixels per latent."""
        return self.family.scale(self.config)

    @property
    def temporal(self) -> int:
        """Temporal compression (1 for images)."""
        return self.family.temporal(self.config)

    @property
    def default_tile(self) -> int:
        """The class's own tile size in pixels."""
        return self.family.default_tile(self.config)

    @property
    def patch_size(self) -> int:
        return self.family.patch_size(self.config)

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


def architectures() -> tuple[str, ...]:
    """The names :func:`architecture` knows."""
    return tuple(sorted(p.stem for p in _config_file("architectures").glob("*.json")))


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


WEIGHTS = "diffusion_pytorch_model.safetensors"


def read_weights(spec: ModelSpec, keys: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """A few tensors of the VAE's safetensors weights (e.g. BatchNorm statistics that its pipeline
    scales latents with), read without loading the model."""
    from safetensors import SafetensorError, safe_open

    if spec.local:
        path = Path(spec.source) / spec.subfolder / WEIGHTS
    else:
        from huggingface_hub import hf_hub_download

        try:
            path = Path(hf_hub_download(spec.source, WEIGHTS, subfolder=spec.subfolder or None))
        except Exception as exc:  # the hub client raises many types; all mean "not there"
            raise VaeparError(f"model '{spec.name}': cannot fetch {WEIGHTS} ({type(exc).__name__})") from None
    try:
        with safe_open(str(path), framework="pt") as f:
            missing = [k for k in keys if k not in f.keys()]
            if missing:
                raise VaeparError(f"model '{spec.name}': {path} has no {', '.join(missing)}")
            return {k: f.get_tensor(k) for k in keys}
    except (SafetensorError, OSError) as exc:
        raise VaeparError(f"model '{spec.name}': cannot read {path} ({exc})") from None


def model_reference(spec: ModelSpec) -> str:
    """How a latent file names its model so that decode finds it again: a local folder by its
    absolute path (even one named like a preset), a preset or hub id by name."""
    if spec.local and not spec.preset:
        return str(Path(spec.source).resolve())
    return spec.name
