"""vaepar.protocol against diffusers' unmodified Remote VAE client.

``requests.post`` inside ``diffusers.utils.remote_utils`` is replaced by a fake server: it prepares
the client's call as requests would send it (URL with the encoded query, headers, body), runs it
through vaepar.protocol with a stand-in VAE, and answers with a real ``requests.Response`` built from
our response. No network, no model weights.
"""

from __future__ import annotations

import io
import json
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import numpy as np
import pytest
import requests
import torch
from diffusers.utils import remote_utils
from diffusers.utils.remote_utils import remote_decode, remote_encode
from PIL import Image
from requests.structures import CaseInsensitiveDict

from vaepar import protocol
from vaepar.latents import Factors
from vaepar.outputs import to_uint8
from vaepar.pixels import from_uint8
from vaepar.protocol import (DecodeRequest, Limits, ProtocolError, Reply, Response, Scaling, accepts,
                             decode_response, encode_response, error_body, model_latents, mp4_response,
                             parse_decode, parse_encode)
from vaepar.vae import ModelSpec, architecture

ENDPOINT = "http://vaepar.test/predict?token=abc"
SD = architecture("sd-vae")  # scale 8, scaling_factor 0.13025, no shift
FLUX = ModelSpec(name="flux", source="", subfolder="", local=True, overrides={"packed": True},
                 config={"_class_name": "AutoencoderKL", "latent_channels": 16, "block_out_channels": [8] * 4,
                         "scaling_factor": 0.3611, "shift_factor": 0.1159})
WAN = architecture("wan-vae")  # scale 8, temporal 4, 16 channels


def fake_vae_decode(z: torch.Tensor, limits: Limits) -> torch.Tensor:
    """A stand-in decoder: the first 3 channels squashed to [-1, 1], each latent a scale x scale
    block, each latent frame after the first ``temporal`` frames."""
    x = torch.tanh(z[:, :3].float()).repeat_interleave(limits.scale, -1).repeat_interleave(limits.scale, -2)
    if x.ndim == 5:
        x = torch.cat([x[:, :, :1], x[:, :, 1:].repeat_interleave(limits.temporal, 2)], dim=2)
    return x


def fake_vae_encode(x: torch.Tensor, scale: int) -> torch.Tensor:
    """A stand-in encoder: 8x8 means of the pixels, 4 latent channels."""
    z = torch.nn.functional.avg_pool2d(x.float(), scale)
    return torch.cat([z, z[:, :1] * 2], dim=1)


def http_response(response: Response) -> requests.Response:
    r = requests.Response()
    r.status_code, r._content = response.status, response.body
    r.headers = CaseInsensitiveDict(response.headers)
    r.encoding = "utf-8"
    return r


@dataclass
class FakeServer:
    """Answers ``requests.post`` with vaepar.protocol; records what it saw and what it answered."""

    spec: ModelSpec
    max_pixels: int = 1 << 20
    mp4: bytes = b"\x00\x00\x00\x18ftypisom fake mp4"
    tamper: Callable[[dict[str, Any]], None] | None = None
    queries: list[list[tuple[str, str]]] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    requests: list[Any] = field(default_factory=list)
    latents: list[torch.Tensor] = field(default_factory=list)
    samples: list[torch.Tensor] = field(default_factory=list)
    responses: list[Response] = field(default_factory=list)

    @property
    def limits(self) -> Limits:
        return Limits.of(self.spec, self.max_pixels)

    def post(self, url: str, **kwargs: Any) -> requests.Response:
        if self.tamper:
            self.tamper(kwargs)
        sent = requests.Request("POST", url, **kwargs).prepare()
        query = parse_qsl(urlsplit(sent.url).query, keep_blank_values=True)
        self.queries.append(query)
        self.headers.append(dict(sent.headers))
        try:
            response = self.handle(query, dict(sent.headers), sent.body or b"")
        except ProtocolError as exc:
            response = protocol.error_response(exc)
        self.responses.append(response)
        return http_response(response)

    def handle(self, query: list[tuple[str, str]], headers: dict[str, str], body: bytes) -> Response:
        if headers.get("Content-Type") == "tensor/binary":
            return self.decode(parse_decode(query, headers, body, self.limits))
        request = parse_encode(query, headers, body, self.limits)
        self.requests.append(request)
        return encode_response(fake_vae_encode(request.pixels, self.limits.scale), request.factors, request.dtype)

    def decode(self, request: DecodeRequest) -> Response:
        self.requests.append(request)
        z = model_latents(request, self.spec)
        self.latents.append(z)
        self.samples.append(fake_vae_decode(z, self.limits))
        if request.reply is Reply.MP4:
            return mp4_response(self.mp4)
        return decode_response(self.samples[-1], request.reply, request.latents.dtype)


@pytest.fixture
def serve(monkeypatch: pytest.MonkeyPatch) -> Callable[..., FakeServer]:
    def start(spec: ModelSpec = SD, **kwargs: Any) -> FakeServer:
        server = FakeServer(spec, **kwargs)
        monkeypatch.setattr(remote_utils.requests, "post", server.post)
        return server

    return start


def latents(*shape: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def decode(z: torch.Tensor, **kwargs: Any) -> Any:
    kwargs.setdefault("do_scaling", False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # do_scaling's deprecation
        return remote_decode(ENDPOINT, z, **kwargs)


def client_error(call: Callable[[], Any]) -> str:
    """The message of the RuntimeError the client raises for an error response."""
    with pytest.raises(RuntimeError) as info:
        call()
    (payload,) = info.value.args
    return payload["error"]


# --- what the client sends -------------------------------------------------------------------


def test_client_query_is_parsed_as_sent(serve: Callable[..., FakeServer]) -> None:
    server = serve()
    decode(latents(1, 4, 2, 3), do_scaling=True, scaling_factor=0.18215, shift_factor=0.5,
           output_type="pt", partial_postprocess=True, return_type="pt")
    query = server.queries[0]
    assert ("token", "abc") in query  # the endpoint's own parameters arrive too and are ignored
    assert [v for k, v in query if k == "shape"] == ["1", "4", "2", "3"]
    assert ("partial_postprocess", "True") in query and ("dtype", "float32") in query
    assert ("scaling_factor", "0.18215") in query and ("shift_factor", "0.5") in query
    assert server.headers[0]["Accept"] == "tensor/binary"
    request = server.requests[0]
    assert request.reply is Reply.UINT8 and request.size is None
    assert request.scaling == Scaling(scaling=0.18215, shift=0.5, use_model=False)


# --- decode: every output type ---------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_pt_float_round_trips_in_request_dtype(serve: Callable[..., FakeServer], dtype: torch.dtype) -> None:
    server = serve()
    z = latents(2, 4, 3, 5, dtype=dtype)
    out = decode(z, output_type="pt", return_type="pt")
    received = server.requests[0].latents
    assert received.dtype == dtype and torch.equal(received.view(torch.int8), z.view(torch.int8))  # bit-exact
    want = fake_vae_decode(z, server.limits).to(dtype)
    assert out.dtype == dtype and out.shape == (2, 3, 24, 40)
    assert torch.equal(out.view(torch.int8), want.view(torch.int8))


def test_pt_partial_postprocess_gives_uint8_channels_last(serve: Callable[..., FakeServer]) -> None:
    server = serve()
    z = latents(2, 4, 3, 5)
    out = decode(z, output_type="pt", partial_postprocess=True, return_type="pt")
    assert out.dtype == torch.uint8 and out.shape == (2, 24, 40, 3)
    assert np.array_equal(out.numpy(), to_uint8(server.samples[0]))
    images = decode(z, output_type="pt", partial_postprocess=True, return_type="pil")
    assert [im.size for im in images] == [(40, 24)] * 2
    assert np.array_equal(np.asarray(images[1]), to_uint8(server.samples[0])[1])


def test_pil_png_is_one_exact_image(serve: Callable[..., FakeServer]) -> None:
    server = serve()
    image = decode(latents(1, 4, 3, 5), output_type="pil", image_format="png")
    assert server.headers[0]["Accept"] == "image/png" and server.responses[0].headers["Content-Type"] == "image/png"
    assert isinstance(image, Image.Image) and image.format == "png" and image.size == (40, 24)
    assert np.array_equal(np.asarray(image), to_uint8(server.samples[0])[0])


def test_pil_jpeg_is_one_image(serve: Callable[..., FakeServer]) -> None:
    server = serve()
    image = decode(latents(1, 4, 4, 6), output_type="pil", image_format="jpg")
    assert server.headers[0]["Accept"] == "image/jpeg" and server.responses[0].body[:2] == b"\xff\xd8"
    assert image.format == "jpeg" and image.size == (48, 32)
    pixels = to_uint8(server.samples[0])[0]
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=95)
    assert np.array_equal(np.asarray(image), np.asarray(Image.open(buffer)))  # those pixels, as JPEG
    assert np.abs(np.asarray(image).astype(int) - pixels.astype(int)).mean() < 10


def test_pil_with_a_processor_gets_unit_floats(serve: Callable[..., FakeServer]) -> None:
    from diffusers.image_processor import VaeImageProcessor

    server = serve()
    images = decode(latents(2, 4, 3, 5), output_type="pil", processor=VaeImageProcessor())
    assert server.headers[0]["Accept"] == "tensor/binary" and server.requests[0].reply is Reply.UNIT
    assert len(images) == 2 and np.array_equal(np.asarray(images[1]), to_uint8(server.samples[0])[1])


def test_video_pt_partial_postprocess_gives_frames(serve: Callable[..., FakeServer]) -> None:
    server = serve(WAN)
    z = latents(1, 16, 3, 2, 3)
    frames = decode(z, output_type="pt", partial_postprocess=True, return_type="pt")
    assert frames.dtype == torch.uint8 and frames.shape == (9, 16, 24, 3)  # (3 - 1) * 4 + 1 frames
    assert np.array_equal(frames.numpy(), to_uint8(server.samples[0])[0])
    video = decode(z, output_type="pt", return_type="pt")
    assert video.shape == (1, 3, 9, 16, 24) and torch.equal(video, server.samples[1])


def test_video_pil_with_a_video_processor_gets_frames(serve: Callable[..., FakeServer]) -> None:
    from diffusers.video_processor import VideoProcessor

    server = serve(WAN)
    frames = decode(latents(1, 16, 2, 2, 3), output_type="pil", processor=VideoProcessor())
    assert len(frames) == 5 and frames[0].size == (24, 16)
    assert np.array_equal(np.asarray(frames[4]), to_uint8(server.samples[0])[0, 4])


def test_mp4_bytes_pass_through(serve: Callable[..., FakeServer]) -> None:
    server = serve(WAN)
    out = decode(latents(1, 16, 2, 2, 3), output_type="mp4", return_type="mp4")
    assert server.headers[0]["Accept"] == "text/plain" and server.responses[0].headers["Content-Type"] == "text/plain"
    assert out == server.mp4


# --- decode: packed latents and scaling ------------------------------------------------------


def pack(z: torch.Tensor) -> torch.Tensor:
    """Flux's packing, as its pipeline does: 2x2 latent patches become tokens of 4C."""
    b, c, h, w = z.shape
    return z.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def test_packed_flux_latents_are_unpacked_with_height_and_width(serve: Callable[..., FakeServer]) -> None:
    server = serve(FLUX)
    z = latents(1, 16, 4, 6)
    image = decode(pack(z), height=32, width=48, output_type="pil", image_format="png")
    assert server.requests[0].size == (32, 48) and server.requests[0].latents.shape == (1, 6, 64)
    assert torch.equal(server.latents[0], z) and image.size == (48, 32)


def test_packed_latents_that_do_not_fit_the_size_are_refused(serve: Callable[..., FakeServer]) -> None:
    server = serve(FLUX)
    message = client_error(lambda: decode(pack(latents(1, 16, 4, 6)), height=48, width=48))
    assert server.responses[0].status == 400 and "do not fit a 48x48 image" in message


SCALINGS = {
    "factor": ({"do_scaling": True, "scaling_factor": 0.5}, lambda z: z / 0.5),
    "factor and shift": ({"do_scaling": True, "scaling_factor": 0.5, "shift_factor": 0.25}, lambda z: z / 0.5 + 0.25),
    "model's own": ({"do_scaling": True}, lambda z: z / 0.3611 + 0.1159),
    "none": ({"do_scaling": False}, lambda z: z),
}


@pytest.mark.parametrize("case", SCALINGS)
def test_scaling_as_the_client_means_it(serve: Callable[..., FakeServer], case: str) -> None:
    kwargs, want = SCALINGS[case]
    server = serve(FLUX)
    z = latents(1, 16, 2, 2)
    decode(z, output_type="pt", return_type="pt", **kwargs)
    assert torch.allclose(server.latents[0], want(z), rtol=0, atol=1e-6)


def test_scaling_decision_is_data() -> None:
    model = Factors(scaling=0.3611, shift=0.1159)
    assert Scaling().factors(model) == Factors()
    assert Scaling(use_model=True).factors(model) == model
    assert Scaling(use_model=True, shift=0.5).factors(model) == Factors(scaling=0.3611, shift=0.5)
    assert Scaling(scaling=2.0, use_model=True).factors(model) == Factors(scaling=2.0)


# --- encode ----------------------------------------------------------------------------------


def test_encode_a_pil_image(serve: Callable[..., FakeServer]) -> None:
    server = serve()
    rgba = np.random.default_rng(0).integers(0, 256, (16, 24, 4), dtype=np.uint8)
    out = remote_encode(ENDPOINT, Image.fromarray(rgba, "RGBA"), scaling_factor=0.5, shift_factor=0.25)
    assert "Content-Type" not in server.headers[0]
    pixels = from_uint8(rgba[..., :3])[None]
    assert torch.equal(server.requests[0].pixels, pixels)
    assert out.dtype == torch.float32 and torch.equal(out, (fake_vae_encode(pixels, 8) - 0.25) * 0.5)


def test_encode_a_bf16_tensor_round_trips(serve: Callable[..., FakeServer]) -> None:
    server = serve()
    x = (torch.rand(2, 3, 16, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1).to(torch.bfloat16)
    out = remote_encode(ENDPOINT, x)
    assert torch.equal(server.requests[0].pixels.view(torch.int16), x.view(torch.int16))
    assert out.dtype == torch.bfloat16 and out.shape == (2, 4, 2, 1)
    assert torch.equal(out.view(torch.int16), fake_vae_encode(x, 8).to(torch.bfloat16).view(torch.int16))


def test_encode_refuses_a_body_that_is_no_image() -> None:
    with pytest.raises(ProtocolError) as info:
        parse_encode({}, {}, b"GIF89a....", Limits())
    assert info.value.status == 415


def test_encode_refuses_too_large_an_image_from_its_header() -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64)).save(buffer, format="PNG")
    with pytest.raises(ProtocolError) as info:
        parse_encode({}, {}, buffer.getvalue(), Limits(max_pixels=64 * 63))
    assert info.value.status == 413 and "64x64" in info.value.message


def test_encode_refuses_pixels_out_of_range() -> None:
    x = torch.full((1, 3, 8, 8), 2.0)
    query = [("shape", "1"), ("shape", "3"), ("shape", "8"), ("shape", "8"), ("dtype", "float32")]
    with pytest.raises(ProtocolError, match=r"\[-1, 1\]"):
        parse_encode(query, {}, x.numpy().tobytes(), Limits())


# --- bad requests ----------------------------------------------------------------------------


def test_truncated_body(serve: Callable[..., FakeServer]) -> None:
    server = serve(tamper=lambda kw: kw.update(data=kw["data"][:-2]))
    message = client_error(lambda: decode(latents(1, 4, 2, 2, dtype=torch.float16), output_type="pt", return_type="pt"))
    assert server.responses[0].status == 400
    assert message == "body has 30 bytes but shape [1, 4, 2, 2] of float16 needs 32"


def test_unknown_dtype(serve: Callable[..., FakeServer]) -> None:
    server = serve()
    message = client_error(lambda: decode(latents(1, 4, 2, 2, dtype=torch.float64), output_type="pt", return_type="pt"))
    assert server.responses[0].status == 400 and "got 'float64'" in message


def test_shape_disagreeing_with_byte_count(serve: Callable[..., FakeServer]) -> None:
    server = serve(tamper=lambda kw: kw["params"].update(shape=[1, 4, 2, 3]))
    message = client_error(lambda: decode(latents(1, 4, 2, 2), output_type="pt", return_type="pt"))
    assert server.responses[0].status == 400 and "64 bytes" in message and "needs 96" in message


def test_nan_in_body(serve: Callable[..., FakeServer]) -> None:
    server = serve()
    z = latents(1, 4, 2, 2)
    z[0, 1, 1, 0] = float("nan")
    message = client_error(lambda: decode(z, output_type="pt", return_type="pt"))
    assert server.responses[0].status == 400 and "1 NaN" in message


def test_too_many_pixels_is_413_before_any_tensor(serve: Callable[..., FakeServer],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    server = serve(max_pixels=512 * 512)

    def no_tensor(*args: Any, **kwargs: Any) -> torch.Tensor:
        raise AssertionError("a tensor was built")

    z = latents(1, 4, 64, 65)  # 512 x 520 pixels
    monkeypatch.setattr(protocol.torch, "frombuffer", no_tensor)
    message = client_error(lambda: decode(z, output_type="pt", return_type="pt"))
    assert server.responses[0].status == 413 and "266240 pixels" in message and "262144" in message


def test_too_many_video_frames_is_413() -> None:
    query = [("shape", v) for v in ("1", "16", "21", "60", "104")] + [("dtype", "float16"), ("output_type", "mp4")]
    with pytest.raises(ProtocolError) as info:
        parse_decode(query, {}, b"", Limits.of(WAN, 832 * 480 * 80))
    assert info.value.status == 413 and str(81 * 832 * 480) in info.value.message


def test_missing_shape() -> None:
    with pytest.raises(ProtocolError, match="missing query parameter 'shape'") as info:
        parse_decode([("dtype", "float16")], {}, b"\x00\x00", Limits())
    assert info.value.status == 400


def base_query(*shape: int) -> list[tuple[str, str]]:
    return [("shape", str(n)) for n in shape] + [("dtype", "float32")]


def body(*shape: int) -> bytes:
    return torch.zeros(shape).numpy().tobytes()


@pytest.mark.parametrize("extra,headers,status,text", [
    ([("height", "16")], {}, 400, "both height and width"),
    ([("partial_postprocess", "maybe"), ("output_type", "pt")], {}, 400, "True or False"),
    ([("scaling_factor", "0")], {}, 400, "must not be 0"),
    ([("scaling_factor", "inf")], {}, 400, "finite"),
    ([("output_type", "gif")], {}, 400, "output_type must be one of"),
    ([("output_type", "mp4")], {}, 400, "needs video latents"),
    ([("output_type", "pt")], {"Accept": "image/png"}, 406, "Accept"),
    ([], {"Content-Type": "image/png"}, 415, "raw tensor bytes"),
])
def test_bad_parameters(extra: list[tuple[str, str]], headers: dict[str, str], status: int, text: str) -> None:
    with pytest.raises(ProtocolError) as info:
        parse_decode(base_query(1, 4, 2, 2) + extra, headers, body(1, 4, 2, 2), Limits())
    assert info.value.status == status and text in info.value.message


def test_pil_of_a_batch_is_refused() -> None:
    with pytest.raises(ProtocolError, match="returns one image"):
        parse_decode(base_query(2, 4, 2, 2), {"accept": "image/jpeg"}, body(2, 4, 2, 2), Limits())


def test_packed_latents_need_height_and_width() -> None:
    with pytest.raises(ProtocolError, match="need the image's height and width"):
        parse_decode(base_query(1, 4, 64), {}, body(1, 4, 64), Limits())


def test_lenient_parameters_and_unknown_ones_ignored() -> None:
    query = base_query(1, 4, 2, 2) + [("output_type", "pt"), ("partial_postprocess", "1"), ("do_scaling", "true"),
                                      ("input_tensor_type", "binary"), ("height", "16"), ("width", "16")]
    request = parse_decode(query, {"ACCEPT": "*/*"}, body(1, 4, 2, 2), Limits())
    assert request.reply is Reply.UINT8 and request.scaling == Scaling(use_model=True) and request.size is None
    compact = parse_decode({"shape": "[1, 4, 2, 2]", "dtype": "float32", "partial_postprocess": "0",
                            "output_type": "pt"}, {}, body(1, 4, 2, 2), Limits())
    assert compact.reply is Reply.FLOAT and compact.latents.shape == (1, 4, 2, 2)


def test_accept_header_matching() -> None:
    assert accepts(None, "image/png") and accepts("*/*", "tensor/binary") and accepts("image/*;q=0.9", "image/png")
    assert not accepts("image/jpeg", "image/png") and not accepts("image/png;q=0, text/plain", "image/png")


def test_limits_of_models() -> None:
    assert Limits.of(SD, 100) == Limits(max_pixels=100, scale=8, temporal=1)
    assert Limits.of(WAN) == Limits(scale=8, temporal=4) and Limits.of(WAN).frames(21) == 81


def test_error_body_is_the_json_the_client_reads() -> None:
    assert json.loads(error_body('bad "shape"')) == {"error": 'bad "shape"'}
    response = protocol.error_response(ProtocolError("too big", 413))
    assert response.status == 413 and response.headers["Content-Type"] == "application/json"
    assert http_response(response).json() == {"error": "too big"}


# --- what the server checks before the workers -------------------------------------------------


def test_token_from_bearer_header_or_query() -> None:
    assert protocol.token_of([], {"Authorization": "Bearer abc"}) == "abc"
    assert protocol.token_of([], {"authorization": "bearer  abc "}) == "abc"
    assert protocol.token_of([("token", "xyz")], {}) == "xyz"
    assert protocol.token_of([("token", "xyz")], {"Authorization": "Basic dTpw"}) == "xyz"
    assert protocol.token_of([], {"Authorization": "Basic dTpw"}) is None
    assert protocol.token_of([], {}) is None


def test_decode_head_gives_the_exact_body_length_before_the_body() -> None:
    query = [("shape", "1"), ("shape", "4"), ("shape", "8"), ("shape", "6"), ("dtype", "bfloat16"),
             ("output_type", "pt")]
    head = protocol.check_decode(query, {}, Limits())
    assert head.shape == (1, 4, 8, 6) and head.dtype == torch.bfloat16 and head.body_bytes == 1 * 4 * 8 * 6 * 2
    with pytest.raises(ProtocolError) as caught:
        protocol.check_decode([("shape", "1"), ("shape", "4"), ("shape", "512"), ("shape", "512"),
                               ("dtype", "float32")], {}, Limits(max_pixels=1 << 20))
    assert caught.value.status == 413


def test_mp4_returns_one_video() -> None:
    query = [*(("shape", str(s)) for s in (2, 16, 3, 8, 8)), ("dtype", "float32"), ("output_type", "mp4")]
    with pytest.raises(ProtocolError, match="one video"):
        protocol.check_decode(query, {}, Limits.of(WAN))


def test_encode_body_limit() -> None:
    limits = Limits(max_pixels=64 * 64)
    shape = [("shape", s) for s in ("1", "3", "64", "64")]
    assert protocol.encode_body_limit([*shape, ("dtype", "float16")], limits) == 3 * 64 * 64 * 2
    assert protocol.encode_body_limit([], limits) == 64 * 64 * 8 + (1 << 20)
    with pytest.raises(ProtocolError) as caught:
        protocol.encode_body_limit([("shape", "1"), ("shape", "3"), ("shape", "65"), ("shape", "64"),
                                    ("dtype", "float32")], limits)
    assert caught.value.status == 413


def encode_request(*shape: int) -> protocol.EncodeRequest:
    return protocol.EncodeRequest(pixels=torch.zeros(shape), factors=Factors(), dtype=torch.float32)


def test_model_pixels_fit_the_model() -> None:
    assert protocol.model_pixels(encode_request(1, 3, 16, 24), WAN).shape == (1, 3, 1, 16, 24)  # one frame
    assert protocol.model_pixels(encode_request(1, 3, 5, 16, 24), WAN).shape == (1, 3, 5, 16, 24)
    for request, spec, words in [(encode_request(1, 3, 4, 16, 16), WAN, "4 frames"),
                                 (encode_request(1, 3, 5, 16, 16), SD, "encodes images"),
                                 (encode_request(1, 3, 16, 20), SD, "not a multiple of 8")]:
        with pytest.raises(ProtocolError, match=words) as caught:
            protocol.model_pixels(request, spec)
        assert caught.value.status == 400


def test_model_latents_are_checked_cast_then_unscaled() -> None:
    z = latents(1, 4, 4, 4, dtype=torch.float16)
    request = DecodeRequest(latents=z, size=None, scaling=Scaling(scaling=0.3), reply=Reply.FLOAT)
    out = model_latents(request, SD, dtype=torch.float32)
    assert out.dtype == torch.float32 and torch.equal(out, z.float() / 0.3)
    wrong = DecodeRequest(latents=latents(1, 3, 4, 4), size=None, scaling=Scaling(), reply=Reply.FLOAT)
    with pytest.raises(ProtocolError, match="3 channels"):
        model_latents(wrong, SD)
    video = DecodeRequest(latents=latents(1, 16, 4, 4), size=None, scaling=Scaling(), reply=Reply.FLOAT)
    with pytest.raises(ProtocolError, match="video VAE"):
        model_latents(video, WAN)
