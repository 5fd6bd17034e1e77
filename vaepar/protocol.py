"""The wire format of diffusers' Remote VAE client (``remote_decode`` / ``remote_encode``).

Pure functions and frozen dataclasses for ``vaepar serve`` (:mod:`vaepar.server`): parse a request from its query
parameters, headers and body, and build a response as ``(status, headers, body)``. No HTTP
framework, no sockets, no distributed code, no I/O.

Decode: :func:`parse_decode` validates the declared shape and dtype, refuses too many output pixels
(413) before building any tensor, and builds the latents from the raw little-endian body.
:func:`model_latents` unpacks packed Flux latents and applies the client's scaling choice
(:class:`Scaling`) with the model's own :class:`~vaepar.latents.Factors`; the server decodes the
result and hands the sample in [-1, 1] to :func:`decode_response` (or, for MP4, its file to
:func:`mp4_response`).

Encode: :func:`parse_encode` reads a PNG/JPEG image (or a raw pixel tensor) into pixels in [-1, 1];
the server encodes them (taking the posterior's mode: deterministic, as ``vaepar encode``) and
hands the latents to :func:`encode_response`, which scales them ``(z - shift) * scale`` as asked.

Errors: :class:`ProtocolError` carries the HTTP status; :func:`error_response` renders it as the
JSON body the client expects (it raises ``RuntimeError(response.json())`` on any status >= 400).
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import numpy as np
import torch

from vaepar.errors import VaeparError
from vaepar.latents import Factors, check_latents, nonfinite, unpack
from vaepar.outputs import to_uint8
from vaepar.pixels import from_uint8
from vaepar.vae import ModelSpec

DTYPES: dict[str, torch.dtype] = {"float16": torch.float16, "float32": torch.float32, "bfloat16": torch.bfloat16}
"""Request dtypes, named as the client names them (the text after ``torch.``)."""
REPLY_DTYPES = ("float16", "float32", "bfloat16", "uint8")
"""The only dtypes the client can read back (its ``DTYPE_MAP``)."""
TENSOR = "tensor/binary"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC = b"\xff\xd8"
OUTPUT_TYPES = ("pil", "pt", "mp4")
TRUE, FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")
DEFAULT_MAX_PIXELS = 64 * 1024 * 1024
"""Output pixels per request (all images or frames together): 64 Mpx, e.g. 81 frames of 832x480."""

Query = Mapping[str, str | Sequence[str]] | Iterable[tuple[str, str]]
"""Query parameters: ``(key, value)`` pairs (repeated keys kept) or a mapping to a value or a list
of values. Pass a multi-dict's pairs (e.g. Starlette's ``query_params.multi_items()``), not a view
that keeps only the last value of ``shape``."""


class ProtocolError(VaeparError):
    """A request the server refuses, with the HTTP status to answer (400, 406, 413 or 415)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


@dataclass(frozen=True, slots=True)
class Response:
    """An HTTP response: status code, headers and body bytes."""

    status: int
    headers: dict[str, str]
    body: bytes


def error_body(message: str) -> bytes:
    """``{"error": message}`` as UTF-8 JSON: what the client shows in its ``RuntimeError``."""
    return json.dumps({"error": message}).encode()


def error_response(exc: ProtocolError) -> Response:
    """The JSON error response for a refused request."""
    return Response(exc.status, {"Content-Type": "application/json"}, error_body(exc.message))


@dataclass(frozen=True, kw_only=True, slots=True)
class Limits:
    """What the server accepts: output pixels per request, and the model's spatial and temporal
    compression used to count them from the declared latent shape."""

    max_pixels: int = DEFAULT_MAX_PIXELS
    scale: int = 8
    temporal: int = 4

    @staticmethod
    def of(spec: ModelSpec, max_pixels: int = DEFAULT_MAX_PIXELS) -> Limits:
        """The limits for a model: its spatial and temporal compression."""
        return Limits(max_pixels=max_pixels, scale=spec.scale, temporal=spec.temporal)

    def frames(self, latent_frames: int) -> int:
        """Frames decoded from ``latent_frames`` (causal video VAEs: the first frame stands alone)."""
        return (latent_frames - 1) * self.temporal + 1


class Reply(str, Enum):
    """What a decode response holds, decided from output_type, image_format, partial_postprocess
    and Accept, as the client will read it."""

    JPEG = "jpeg"  # output_type=pil: one JPEG image
    PNG = "png"  # output_type=pil: one PNG image
    FLOAT = "float"  # pt, partial_postprocess=False: the sample in [-1, 1], request dtype
    UINT8 = "uint8"  # pt, partial_postprocess=True: uint8 (B, H, W, 3) / frames (B*F, H, W, 3)
    UNIT = "unit"  # pil with a client-side processor (Accept tensor/binary): float32 [0, 1] (N, 3, H, W)
    MP4 = "mp4"  # the server's MP4 file, through mp4_response


IMAGE_FORMATS = {"jpg": Reply.JPEG, "jpeg": Reply.JPEG, "png": Reply.PNG}


@dataclass(frozen=True, kw_only=True, slots=True)
class Scaling:
    """The client's scaling choice, as data.

    ``scaling`` given: ``z / scaling`` then ``+ shift`` when given (``do_scaling`` is then moot).
    Only ``use_model`` (``do_scaling=True``): the model's own factors (a given ``shift`` replaces the
    model's). Neither: the latents are decoded as given.
    """

    scaling: float | None = None
    shift: float | None = None
    use_model: bool = False

    def factors(self, model: Factors) -> Factors:
        """The factors to ``unscale`` the latents with, given the model's own."""
        if self.scaling is not None or not self.use_model:
            return Factors(scaling=self.scaling, shift=self.shift)
        return model if self.shift is None else dataclasses.replace(model, shift=self.shift)


@dataclass(frozen=True, kw_only=True, slots=True, eq=False)
class DecodeRequest:
    """A validated decode request."""

    latents: torch.Tensor
    """As sent, in the request's dtype: ``(B, C, H, W)``, packed ``(B, N, 4C)`` or ``(B, C, F, H, W)``."""
    size: tuple[int, int] | None
    """``(height, width)`` in pixels, for packed latents only."""
    scaling: Scaling
    reply: Reply


@dataclass(frozen=True, kw_only=True, slots=True, eq=False)
class EncodeRequest:
    """A validated encode request."""

    pixels: torch.Tensor
    """``(B, 3, H, W)`` or ``(B, 3, F, H, W)`` in [-1, 1]; float32 from an image, else as sent."""
    factors: Factors
    """Applied by :func:`encode_response`: ``(z - shift) * scaling``, each when given."""
    dtype: torch.dtype
    """The reply's dtype: the tensor's as sent, float32 for an image."""


# --- query parameters ------------------------------------------------------------------------


def _params(query: Query) -> dict[str, list[str]]:
    """Query parameters as ``{key: [values]}``, repeated keys kept in order."""
    pairs = query.items() if isinstance(query, Mapping) else query
    params: dict[str, list[str]] = {}
    for key, value in pairs:
        values = [value] if isinstance(value, (str, int, float)) else list(value)
        params.setdefault(key, []).extend(str(v) for v in values)
    return params


def _one(params: dict[str, list[str]], key: str) -> str | None:
    """The last value of a scalar parameter, or None when absent."""
    values = params.get(key)
    return values[-1].strip() if values else None


def _bool(params: dict[str, list[str]], key: str, default: bool) -> bool:
    """``True``/``False`` (the client's Python spelling), true/false, 1/0, yes/no, on/off."""
    text = _one(params, key)
    if text is None or text == "":
        return default
    if text.lower() in TRUE:
        return True
    if text.lower() in FALSE:
        return False
    raise ProtocolError(f"{key} must be True or False, got {text!r}")


def _float(params: dict[str, list[str]], key: str) -> float | None:
    """A finite float parameter, or None when absent."""
    text = _one(params, key)
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        raise ProtocolError(f"{key} must be a number, got {text!r}") from None
    if not math.isfinite(value):
        raise ProtocolError(f"{key} must be finite, got {text!r}")
    return value


def _positive_int(key: str, text: str) -> int:
    """``text`` as an integer > 0."""
    try:
        value = int(text)
    except ValueError:
        raise ProtocolError(f"{key} must be a positive integer, got {text!r}") from None
    if value <= 0:
        raise ProtocolError(f"{key} must be a positive integer, got {value}")
    return value


def _choice(params: dict[str, list[str]], key: str, allowed: Sequence[str], default: str) -> str:
    """One of ``allowed`` (case-insensitive), ``default`` when absent."""
    text = (_one(params, key) or default).lower()
    if text not in allowed:
        raise ProtocolError(f"{key} must be one of {', '.join(allowed)}, got {text!r}")
    return text


def _shape(params: dict[str, list[str]], ranks: Sequence[int]) -> tuple[int, ...]:
    """``shape``: one repeated key per dimension (the client), or one ``[1, 4, 64, 64]``/``1,4,64,64``."""
    values = params.get("shape")
    if not values:
        raise ProtocolError("missing query parameter 'shape' (one 'shape' key per dimension)")
    if len(values) == 1 and ("," in values[0] or "[" in values[0]):
        values = [v for v in values[0].strip("[] ").split(",") if v.strip()]
    shape = tuple(_positive_int("shape", v.strip()) for v in values)
    if len(shape) not in ranks:
        raise ProtocolError(f"shape must have {' or '.join(map(str, ranks))} dimensions, got {list(shape)}")
    return shape


def _dtype(params: dict[str, list[str]]) -> torch.dtype:
    """``dtype``: float16, float32 or bfloat16 (a ``torch.`` prefix is tolerated)."""
    name = _one(params, "dtype")
    if name is None:
        raise ProtocolError("missing query parameter 'dtype' (float16, float32 or bfloat16)")
    name = name.removeprefix("torch.")
    if name not in DTYPES:
        raise ProtocolError(f"dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    return DTYPES[name]


def _size(params: dict[str, list[str]], rank: int) -> tuple[int, int] | None:
    """``(height, width)``: both or neither; required for packed latents, ignored otherwise."""
    height, width = _one(params, "height"), _one(params, "width")
    if (height is None) != (width is None):
        raise ProtocolError("give both height and width, or neither")
    if rank != 3:
        return None
    if height is None or width is None:
        raise ProtocolError("packed latents (B, N, 4C) need the image's height and width parameters")
    return _positive_int("height", height), _positive_int("width", width)


def _scaling(params: dict[str, list[str]]) -> Scaling:
    """``scaling_factor``, ``shift_factor`` and ``do_scaling`` as a :class:`Scaling`."""
    scaling = _float(params, "scaling_factor")
    if scaling == 0:
        raise ProtocolError("scaling_factor must not be 0")
    return Scaling(scaling=scaling, shift=_float(params, "shift_factor"),
                   use_model=_bool(params, "do_scaling", False))


# --- headers ---------------------------------------------------------------------------------


def _headers(headers: Mapping[str, str]) -> dict[str, str]:
    """Header names in lower case (HTTP names are case-insensitive)."""
    return {k.lower(): v for k, v in headers.items()}


def accepts(accept: str | None, media: str) -> bool:
    """Whether an ``Accept`` header admits ``media`` (absent, ``*/*``, ``type/*`` or exact; q=0 refuses)."""
    if not accept or not accept.strip():
        return True
    ranges = ("*/*", f"{media.split('/')[0]}/*", media)
    for item in accept.split(","):
        rng, *options = (p.strip().lower() for p in item.split(";"))
        if rng in ranges and _quality(options) > 0:
            return True
    return False


def _quality(options: Sequence[str]) -> float:
    """The ``q`` of a media range's options (1 when absent or unreadable)."""
    for option in options:
        name, _, value = option.partition("=")
        if name.strip() == "q":
            try:
                return float(value)
            except ValueError:
                return 1.0
    return 1.0


def _check_content_type(headers: dict[str, str]) -> None:
    """A decode body is a raw tensor: refuse a body that says it is an image or text."""
    content_type = headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type.startswith(("image/", "video/", "text/")):
        raise ProtocolError(f"decode expects raw tensor bytes (Content-Type {TENSOR}), got {content_type}", 415)


def token_of(query: Query, headers: Mapping[str, str]) -> str | None:
    """The token a request carries: ``Authorization: Bearer TOKEN``, else a ``token`` query parameter
    (how the unmodified client sends one: inside its endpoint URL)."""
    scheme, _, value = _headers(headers).get("authorization", "").strip().partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return _one(_params(query), "token")


# --- limits and tensors ----------------------------------------------------------------------


def output_count(shape: Sequence[int], limits: Limits) -> int:
    """Images (or video frames, all batch items together) a decode of latents ``shape`` yields."""
    return shape[0] * limits.frames(shape[2]) if len(shape) == 5 else shape[0]


def output_pixels(shape: Sequence[int], limits: Limits) -> int:
    """Pixels a decode of latents ``shape`` yields: every image or frame of every batch item."""
    if len(shape) == 3:  # packed: each token is 2x2 latents
        return shape[0] * shape[1] * 4 * limits.scale**2
    return output_count(shape, limits) * shape[-2] * shape[-1] * limits.scale**2


def _check_pixels(pixels: int, limits: Limits, what: str) -> None:
    """413 when ``pixels`` exceeds the limit."""
    if pixels > limits.max_pixels:
        raise ProtocolError(f"{what} would be {pixels} pixels, more than this server's limit of "
                            f"{limits.max_pixels}", 413)


def _from_bytes(body: bytes, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A private copy of the body as a tensor of ``shape`` (row-major, in the host's byte order:
    little-endian on every machine vaepar runs on, as the client sends)."""
    expected = math.prod(shape) * dtype.itemsize
    if len(body) != expected:
        name = str(dtype).removeprefix("torch.")
        raise ProtocolError(f"body has {len(body)} bytes but shape {list(shape)} of {name} needs {expected}")
    return torch.frombuffer(bytearray(body), dtype=dtype).reshape(shape)


def _check_finite(t: torch.Tensor, what: str) -> None:
    """400 naming how many NaN and Inf values ``t`` holds, if any."""
    if (found := nonfinite(t)) is not None:
        raise ProtocolError(f"{what} contain non-finite values ({found})")


# --- decode ----------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True, slots=True)
class DecodeHead:
    """What a decode request declares in its query and headers, validated before its body is read."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    size: tuple[int, int] | None
    scaling: Scaling
    reply: Reply

    @property
    def body_bytes(self) -> int:
        """The exact body length the declared shape and dtype need."""
        return math.prod(self.shape) * self.dtype.itemsize


def check_decode(query: Query, headers: Mapping[str, str], limits: Limits) -> DecodeHead:
    """Validate a ``remote_decode`` request's query and headers; the pixel limit answers 413 from
    the declared shape, so a server can refuse before reading the body."""
    params, hdrs = _params(query), _headers(headers)
    _check_content_type(hdrs)
    shape, dtype = _shape(params, (3, 4, 5)), _dtype(params)
    size, scaling = _size(params, len(shape)), _scaling(params)
    reply = _reply(params, hdrs.get("accept"), shape, limits)
    _check_pixels(output_pixels(shape, limits), limits, f"decoding latents {list(shape)}")
    return DecodeHead(shape=shape, dtype=dtype, size=size, scaling=scaling, reply=reply)


def parse_decode(query: Query, headers: Mapping[str, str], body: bytes, limits: Limits) -> DecodeRequest:
    """Validate a ``remote_decode`` request and build its latents; raises :class:`ProtocolError`.

    Everything is checked from the query and headers first (:func:`check_decode`), then the body's
    length, then its values.
    """
    head = check_decode(query, headers, limits)
    latents = _from_bytes(body, head.shape, head.dtype)
    _check_finite(latents, "latents")
    return DecodeRequest(latents=latents, size=head.size, scaling=head.scaling, reply=head.reply)


def _reply(params: dict[str, list[str]], accept: str | None, shape: tuple[int, ...], limits: Limits) -> Reply:
    """What to send back, checked against Accept (406) and the latents' rank."""
    output = _choice(params, "output_type", OUTPUT_TYPES, "pil")
    if output == "pt":
        return _accepted(Reply.UINT8 if _bool(params, "partial_postprocess", False) else Reply.FLOAT, accept)
    if output == "mp4":
        if len(shape) != 5:
            raise ProtocolError(f"output_type=mp4 needs video latents (B, C, F, H, W), got {list(shape)}")
        if shape[0] != 1:
            raise ProtocolError(f"output_type=mp4 returns one video; send one batch item, got {list(shape)}")
        return _accepted(Reply.MP4, accept)
    image = IMAGE_FORMATS[_choice(params, "image_format", tuple(IMAGE_FORMATS), "jpg")]
    if not accepts(accept, content_type(image)) and accepts(accept, TENSOR):
        return Reply.UNIT  # the client holds a processor and post-processes the tensor itself
    if output_count(shape, limits) != 1:
        raise ProtocolError(f"output_type=pil returns one image, but latents {list(shape)} decode to "
                            f"{output_count(shape, limits)}; use output_type=pt (or mp4 for video)")
    return _accepted(image, accept)


def content_type(reply: Reply) -> str:
    """The response's Content-Type for a kind of reply (MP4 as ``text/plain``, what the client asks)."""
    return {Reply.JPEG: "image/jpeg", Reply.PNG: "image/png", Reply.MP4: "text/plain"}.get(reply, TENSOR)


def _accepted(reply: Reply, accept: str | None) -> Reply:
    """``reply`` if the Accept header admits it (MP4 also as video/mp4), else 406."""
    media = content_type(reply)
    if accepts(accept, media) or (reply is Reply.MP4 and accepts(accept, "video/mp4")):
        return reply
    raise ProtocolError(f"this request's reply is {media}, which the Accept header ({accept}) refuses", 406)


def model_latents(request: DecodeRequest, spec: ModelSpec, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The latents to hand to ``vae.decode``: unpacked (packed Flux latents), checked against the
    model (rank, channels), cast to ``dtype`` (the compute dtype; default: as sent) and unscaled as
    asked, in that order, as ``vaepar decode`` does with a file."""
    z = request.latents
    try:
        if request.size is not None:
            z = unpack(Path("latents"), z, spec, *request.size)
        check_latents(Path("latents"), z, spec)
    except VaeparError as exc:
        raise ProtocolError(str(exc)) from None
    z = z if dtype is None else z.to(dtype)
    return request.scaling.factors(Factors.of(spec)).unscale(z)


def decode_response(sample: torch.Tensor, reply: Reply, dtype: torch.dtype, *, jpeg_quality: int = 95) -> Response:
    """The response for a decoded ``sample`` in [-1, 1], ``(B, 3, H, W)`` or ``(B, 3, F, H, W)``;
    ``dtype``: the request's latents' (the reply's for ``pt`` without post-processing).

    MP4 replies are the server's to encode: send them with :func:`mp4_response`.
    """
    if sample.ndim not in (4, 5) or sample.shape[1] != 3:
        raise ValueError(f"expected a decoded sample (B, 3, H, W) or (B, 3, F, H, W), got {tuple(sample.shape)}")
    if reply in (Reply.JPEG, Reply.PNG):
        return image_response(sample, reply, jpeg_quality=jpeg_quality)
    if reply is Reply.FLOAT:
        return tensor_response(sample.to(dtype))
    if reply is Reply.UINT8:
        pixels = torch.from_numpy(to_uint8(sample))
        return tensor_response(pixels.reshape(-1, *pixels.shape[-3:]))
    if reply is Reply.UNIT:
        return tensor_response(_frames(sample).float().div(2).add(0.5).clamp(0, 1))
    raise ValueError("an MP4 reply holds the server's MP4 file: build it with mp4_response")


def _frames(sample: torch.Tensor) -> torch.Tensor:
    """``(B, 3, F, H, W)`` videos as ``(B*F, 3, H, W)`` frames; images unchanged."""
    if sample.ndim == 4:
        return sample
    return sample.movedim(2, 1).reshape(-1, *sample.shape[1:2], *sample.shape[-2:])


def image_response(sample: torch.Tensor, reply: Reply, *, jpeg_quality: int = 95) -> Response:
    """One image (the client opens exactly one) as JPEG or PNG."""
    from PIL import Image

    pixels = to_uint8(_frames(sample))
    if pixels.shape[0] != 1:
        raise ValueError(f"an image reply holds one image, got {pixels.shape[0]}")
    buffer = io.BytesIO()
    if reply is Reply.JPEG:
        Image.fromarray(pixels[0]).save(buffer, format="JPEG", quality=jpeg_quality)
    else:
        Image.fromarray(pixels[0]).save(buffer, format="PNG")
    return Response(200, {"Content-Type": content_type(reply)}, buffer.getvalue())


def mp4_response(data: bytes) -> Response:
    """The server's MP4 file; the client returns the bytes as they are."""
    return Response(200, {"Content-Type": content_type(Reply.MP4)}, data)


def tensor_response(t: torch.Tensor) -> Response:
    """Raw row-major bytes with ``shape`` (a JSON list) and ``dtype`` headers, as the client reads them."""
    name = str(t.dtype).removeprefix("torch.")
    if name not in REPLY_DTYPES:
        raise ValueError(f"the client reads only {', '.join(REPLY_DTYPES)} tensors, got {name}")
    t = t.detach().cpu().contiguous()
    body = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
    headers = {"Content-Type": TENSOR, "shape": json.dumps(list(t.shape)), "dtype": name}
    return Response(200, headers, body)


# --- encode ----------------------------------------------------------------------------------


def parse_encode(query: Query, headers: Mapping[str, str], body: bytes, limits: Limits) -> EncodeRequest:
    """Validate a ``remote_encode`` request: a PNG/JPEG body (no ``shape``) or a raw pixel tensor."""
    params = _params(query)
    factors = _encode_factors(params)
    if "shape" not in params:
        return EncodeRequest(pixels=_image(body, limits), factors=factors, dtype=torch.float32)
    pixels = _pixel_tensor(params, body, limits)
    return EncodeRequest(pixels=pixels, factors=factors, dtype=pixels.dtype)


def _encode_factors(params: dict[str, list[str]]) -> Factors:
    """The factors to scale encoded latents with: only those given."""
    scaling = _float(params, "scaling_factor")
    if scaling == 0:
        raise ProtocolError("scaling_factor must not be 0")
    return Factors(scaling=scaling, shift=_float(params, "shift_factor"))


def _image(body: bytes, limits: Limits) -> torch.Tensor:
    """A PNG or JPEG body as ``(1, 3, H, W)`` float32 in [-1, 1] (converted to RGB, like pixels.py)."""
    from PIL import Image

    if not body.startswith((PNG_MAGIC, JPEG_MAGIC)):
        raise ProtocolError("encode expects a PNG or JPEG image body, or a raw tensor with shape and dtype", 415)
    try:
        with Image.open(io.BytesIO(body), formats=("PNG", "JPEG")) as img:
            width, height = img.size  # the header only: refuse before decoding the pixels
            _check_pixels(width * height, limits, f"a {width}x{height} image")
            rgb = img.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise ProtocolError(f"not a readable image ({exc})") from None
    return from_uint8(np.asarray(rgb))[None]


def _pixel_head(params: dict[str, list[str]], limits: Limits) -> tuple[tuple[int, ...], torch.dtype]:
    """A pixel tensor's declared shape and dtype: 3 channels, within the pixel limit."""
    shape, dtype = _shape(params, (4, 5)), _dtype(params)
    if shape[1] != 3:
        raise ProtocolError(f"pixels must have 3 channels (B, 3, H, W) or (B, 3, F, H, W), got {list(shape)}")
    _check_pixels(math.prod(shape) // 3, limits, f"pixels {list(shape)}")
    return shape, dtype


def _pixel_tensor(params: dict[str, list[str]], body: bytes, limits: Limits) -> torch.Tensor:
    """A raw pixel tensor ``(B, 3, H, W)`` or ``(B, 3, F, H, W)`` in [-1, 1]."""
    shape, dtype = _pixel_head(params, limits)
    x = _from_bytes(body, shape, dtype)
    _check_finite(x, "pixels")
    low, high = float(x.min()), float(x.max())
    if low < -1 or high > 1:
        raise ProtocolError(f"pixel values must lie in [-1, 1], found [{low:.4g}, {high:.4g}]")
    return x


def model_pixels(request: EncodeRequest, spec: ModelSpec) -> torch.Tensor:
    """The pixels to encode, checked against the model: images for image VAEs; for video VAEs
    ``1 + 4k`` frames (an image is one frame); height and width multiples of the model's scale."""
    x = request.pixels
    if spec.is_video and x.ndim == 4:
        x = x[:, :, None]
    if not spec.is_video and x.ndim == 5:
        raise ProtocolError(f"pixels {list(x.shape)} are a video, but this server's VAE {spec.class_name} "
                            "encodes images (B, 3, H, W)")
    if x.ndim == 5 and (x.shape[2] - 1) % spec.temporal:
        raise ProtocolError(f"{x.shape[2]} frames; {spec.class_name} encodes 1 + {spec.temporal}k frames")
    h, w = x.shape[-2:]
    if h % spec.scale or w % spec.scale:
        raise ProtocolError(f"image size {h}x{w} is not a multiple of {spec.scale} (the model's scale); "
                            "crop or resize it first")
    return x


def encode_body_limit(query: Query, limits: Limits) -> int:
    """The most body bytes an encode request may send: exactly its declared tensor, or for an image
    the largest PNG of ``max_pixels`` (16-bit RGBA, uncompressed, plus headers)."""
    params = _params(query)
    if "shape" not in params:
        return limits.max_pixels * 8 + (1 << 20)
    shape, dtype = _pixel_head(params, limits)
    return math.prod(shape) * dtype.itemsize


def encode_response(latents: torch.Tensor, factors: Factors, dtype: torch.dtype) -> Response:
    """The encoder's latents ``(B, C, h, w)`` (or ``(B, C, f, h, w)``; unpacked even for Flux),
    scaled ``(z - shift) * scaling`` by the request's ``factors``, in the request's ``dtype``."""
    return tensor_response(factors.scale(latents.float()).to(dtype))
