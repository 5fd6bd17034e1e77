"""The interface every VAE family implements."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from vaepar import heap, plan

if TYPE_CHECKING:
    from vaepar.latents import Factors
    from vaepar.vae import ModelSpec

Tick = Callable[[int], None]


@dataclass(frozen=True, kw_only=True, slots=True)
class ShardLeaves:
    """The family's own leaf modules that :func:`vaepar.shard.install` must wrap, beyond the
    generic ones (``nn.Conv2d``, ``nn.GroupNorm``, diffusers' ``Downsample2D``)."""

    attention: tuple[type, ...] = ()
    """Attention blocks over all rows: diffusers' ``Attention`` is split by queries (each rank
    attends with its band's queries over all bands' keys and values); any other block runs on the
    gathered rows on each rank, which keeps its band."""
    frame_attention: tuple[type, ...] = ()
    """Single-head attention within each frame over all its pixels: a per-pixel ``norm``, a 1x1
    ``to_qkv`` convolution, then a 1x1 ``proj`` and the residual (Wan's ``WanAttentionBlock``
    interface); split by queries like diffusers' ``Attention``."""
    causal_attention: tuple[type, ...] = ()
    """Single-head attention over all pixels of all frames, each frame attending to itself and the
    frames before it: a per-pixel ``norm``, 1x1x1 ``to_q``/``to_k``/``to_v``, ``proj_out`` and the
    residual (HunyuanVideo 1.5's ``HunyuanVideo15AttnBlock`` interface); split by queries."""
    causal_convs: tuple[type, ...] = ()
    """Causal 3-D convolutions with a time cache (Wan's ``WanCausalConv3d`` interface)."""
    padded_convs: tuple[type, ...] = ()
    """3-D convolutions that pad their own input, then call a plain ``conv`` (HunyuanVideo 1.5's
    ``time_causal_padding``/``pad_mode`` interface)."""
    edge_frame_convs: tuple[type, ...] = ()
    """3-D convolutions that repeat edge frames in time and leave space to their ``conv``'s own
    ``padding``/``padding_mode`` (LTX-2's ``LTX2VideoCausalConv3d`` interface, ``causal=``)."""


def no_tick(n: int) -> None:
    pass


def _trim_on_cpu(module: torch.nn.Module, args: tuple[Any, ...]) -> None:
    if args and isinstance(args[0], torch.Tensor) and args[0].device.type == "cpu":
        heap.trim()


class Family:
    """A family of diffusers VAE classes.

    Class methods read only the config (usable before any weights are loaded: planning, input
    checks, scaling); an instance wraps a loaded VAE and runs one tile of it as diffusers does.
    """

    classes: ClassVar[tuple[str, ...]] = ()
    """The diffusers class names this family covers."""
    video: ClassVar[bool] = False
    """Whether latents and pixels have a time axis, ``(B, C, F, H, W)``."""
    frame_axis: ClassVar[bool] = False
    """An image family whose class works on ``(B, C, 1, H, W)``: latent files may hold that frame axis."""
    scalar_factors: ClassVar[bool] = False
    """Whether ``--scaling-factor``/``--shift-factor`` apply (a scale and shift for all channels)."""
    scaling_rule: ClassVar[str] = ""
    """How its pipelines (un)scale latents, for messages."""
    decode_returns_tensor: ClassVar[bool] = False
    """Whether the class's own ``_decode`` returns the sample itself rather than a ``DecoderOutput``."""

    # --- what the config says -------------------------------------------------------------------

    @classmethod
    def latent_channels(cls, config: dict[str, Any]) -> int:
        raise NotImplementedError

    @classmethod
    def scale(cls, config: dict[str, Any]) -> int:
        """Spatial compression, pixels per latent."""
        raise NotImplementedError

    @classmethod
    def temporal(cls, config: dict[str, Any]) -> int:
        """Temporal compression (1 for images): ``F`` latent frames decode to ``(F - 1) * t + 1``."""
        return 1

    @classmethod
    def patch_size(cls, config: dict[str, Any]) -> int:
        """Pixel patches the encoder sees as channels (Wan 2.2: 2), else 1."""
        return 1

    @classmethod
    def default_tile(cls, config: dict[str, Any]) -> int:
        """The class's own tile size in pixels."""
        raise NotImplementedError

    @classmethod
    def default_overlap(cls, config: dict[str, Any]) -> float:
        """The overlap factor that gives the class's own default tile stride."""
        return 0.25

    @classmethod
    def factors(cls, spec: ModelSpec, scaling: float | None = None, shift: float | None = None) -> Factors:
        """How the class's pipelines scale latents (``scaling``/``shift``: user overrides, where the
        family has such factors)."""
        raise NotImplementedError

    @classmethod
    def decode_grid(cls, spec: ModelSpec, h: int, w: int, tile: int | None, overlap: float) -> plan.Grid:
        """diffusers' decode tiles for latents ``h`` x ``w`` (untiled when ``tile`` is None)."""
        raise NotImplementedError

    @classmethod
    def encode_grid(cls, spec: ModelSpec, h: int, w: int, tile: int | None, overlap: float) -> plan.Grid:
        """diffusers' encode tiles over pixels ``h`` x ``w`` as the encoder sees them."""
        raise NotImplementedError

    @classmethod
    def shard_leaves(cls) -> ShardLeaves:
        """Which of the class's modules the shard wrappers handle."""
        raise NotImplementedError

    @classmethod
    def own_tiling(cls, vae: torch.nn.Module, spec: ModelSpec) -> tuple[int, float]:
        """Tile size and overlap from the loaded class's own tiling attributes (set by the user's
        ``vae.enable_tiling(...)``), as ``--tile-size``/``--tile-overlap`` would give them."""
        raise NotImplementedError

    @classmethod
    def prepare_pixels(cls, spec: ModelSpec, x: torch.Tensor) -> torch.Tensor:
        """Pixels as the encoder's tiles slice them (Wan 2.2: patchified), else unchanged."""
        return x

    @classmethod
    def upsampler_types(cls) -> tuple[type, ...]:
        """The decoder's modules that raise its resolution (:meth:`heap_trimmed`)."""
        return ()

    # --- a loaded model -------------------------------------------------------------------------

    def __init__(self, vae: torch.nn.Module, spec: ModelSpec) -> None:
        self.vae, self.spec = vae, spec

    def shard_refusals(self) -> list[str]:
        """What in this loaded model ``shard`` cannot reproduce exactly, beyond modules no wrapper
        takes (which :func:`vaepar.shard.unhandled` finds)."""
        return []

    def fresh_activations(self) -> list[torch.nn.Module]:
        """The loaded model's activation modules whose every call takes a fresh temporary (a norm's
        output) that nothing else reads: they may overwrite it (:meth:`activations_in_place`)."""
        return []

    @contextmanager
    def activations_in_place(self) -> Iterator[None]:
        """Within: :meth:`fresh_activations` that have an ``inplace`` switch (``nn.SiLU``) write
        into their input. The same kernel on the same values, so results are bit-identical, with
        one activation-sized temporary fewer per call (a live-memory peak held by a convolution
        does not move). Only without autograd, which needs the activation's input for its
        backward."""
        switched = [] if torch.is_grad_enabled() else [
            m for m in self.fresh_activations() if getattr(m, "inplace", None) is False]
        for m in switched:
            m.inplace = True
        try:
            yield
        finally:
            for m in switched:
                m.inplace = False

    @contextmanager
    def heap_trimmed(self) -> Iterator[None]:
        """Within: on CPU, the heap's free pages go back to the OS (:func:`vaepar.heap.trim`) just
        before the decoder's last :meth:`upsampler_types` module. The steps to full resolution
        allocate only buffers too large for the heap, so the lower resolutions' freed chunks would
        otherwise stay resident beside them: the peak RSS then follows the live tensors. Nothing
        moves, so results are bit-identical; the released pages fault back in during the next
        call (on SD's 256² tiles ~100 MiB, about 1-2 % of the tile's time)."""
        found = [m for m in self.vae.decoder.modules() if isinstance(m, self.upsampler_types())]
        handle = found[-1].register_forward_pre_hook(_trim_on_cpu) if found else None
        try:
            yield
        finally:
            if handle is not None:
                handle.remove()

    def decode_arguments(self, *args: Any, **kwargs: Any) -> None:
        """The extra arguments a caller gave the class's ``_decode`` (beyond ``z`` and ``return_dict``),
        for the tiles that follow."""

    def decode_tile(self, z: torch.Tensor, *, tiled: bool, tick: Tick = no_tick) -> torch.Tensor:
        """Raw decoder output for one tile (or the whole latent when ``tiled`` is False)."""
        raise NotImplementedError

    def encode_tile(self, x: torch.Tensor, *, tiled: bool, tick: Tick = no_tick) -> torch.Tensor:
        """Latent moments (mean and log-variance) of one tile, or of all pixels when not ``tiled``."""
        raise NotImplementedError

    def finish_decode(self, x: torch.Tensor) -> torch.Tensor:
        """Post-processing after the merge (Wan: unpatchify and clamp): :meth:`finish_values`,
        then :meth:`arrange`."""
        return self.arrange(self.finish_values(x))

    def finish_values(self, x: torch.Tensor) -> torch.Tensor:
        """The elementwise part of :meth:`finish_decode` (Wan: clamp). Elementwise, so it may run on
        each rank's part of the raw result before the join, as the CLI's pixel outputs do."""
        return x

    def arrange(self, x: torch.Tensor) -> torch.Tensor:
        """The layout part of :meth:`finish_decode` (Wan 2.2: unpatchify) on the joined result: it
        only moves elements, so it applies to any dtype (the CLI's pixel outputs: uint8)."""
        return x

    def prepare_encode(self, x: torch.Tensor) -> torch.Tensor:
        """Pixels as the encoder's tiles slice them: :meth:`prepare_pixels`."""
        return self.prepare_pixels(self.spec, x)

    def steps(self, x: torch.Tensor, task: str) -> int:
        """Progress units per tile: 1 for images; frames (decode) or time chunks (encode) for video."""
        if x.ndim != 5:
            return 1
        return x.shape[2] if task == "decode" else 1 + (x.shape[2] - 1) // 4

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
