"""Decoding request bodies, choosing and encoding responses, custom attributes."""

from __future__ import annotations

import base64
import csv
import io
import json

import numpy as np
import pytest
from PIL import Image

from serve import codec
from serve.admission import BYTES_PER_DECODED_PIXEL, MemoryGate
from serve.codec import Inputs, Options, choose_response_type, decode, decode_image, parse_options
from serve.errors import (
    BadRequest,
    BatchTooLarge,
    ImagesTooLarge,
    InvalidBase64,
    InvalidImage,
    InvalidJson,
    InvalidTensor,
    NotAcceptable,
    UnsupportedMediaType,
)

from imagedata import encode

LIMIT = 10_000_000
PNG = encode(Image.new("RGB", (8, 6), "red"))


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def decoded(body: bytes, content_type: str | None, **kwargs) -> Inputs:
    return decode(body, content_type, max_pixels=LIMIT, max_instances=kwargs.pop("max_instances", 8), **kwargs)


@pytest.mark.parametrize("content_type", ["image/png", "application/x-image", "Image/PNG; q=1", None,
                                          "application/octet-stream"])
def test_png_under_every_image_content_type(content_type: str | None) -> None:
    inputs = decoded(PNG, content_type)
    assert inputs.single and len(inputs) == 1
    assert (inputs.images[0].mode, inputs.images[0].size) == ("RGB", (8, 6))


@pytest.mark.parametrize(
    ("mode", "image_format"),
    [("L", "PNG"), ("RGBA", "PNG"), ("P", "PNG"), ("CMYK", "JPEG"), ("I;16", "PNG"), ("RGB", "WEBP"),
     ("RGB", "BMP"), ("RGB", "GIF"), ("RGB", "TIFF"), ("LA", "PNG"), ("1", "PNG")],
)
def test_modes_and_formats_become_rgb(mode: str, image_format: str) -> None:
    image = decode_image(encode(Image.new(mode, (5, 4)), image_format), max_pixels=LIMIT)
    assert (image.mode, image.size) == ("RGB", (5, 4))


def test_cmyk_colours_survive_conversion() -> None:
    image = decode_image(encode(Image.new("RGB", (4, 4), (200, 30, 30)).convert("CMYK"), "JPEG"), max_pixels=LIMIT)
    red, green, blue = image.getpixel((1, 1))
    assert red > 150 and green < 80 and blue < 80


def test_16_bit_greyscale_is_scaled_not_clipped() -> None:
    array = np.full((4, 4), 20_000, dtype=np.uint16)
    array[0, 0] = 40_000
    source = Image.fromarray(array)
    assert source.mode == "I;16"
    image = decode_image(encode(source), max_pixels=LIMIT)
    assert image.getpixel((0, 0))[0] == 255
    assert 120 < image.getpixel((2, 2))[0] < 135  # 20000 / 40000 of full scale, not white


def test_exif_orientation_is_applied() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    body = encode(Image.new("RGB", (40, 20)), "JPEG", exif=exif)
    assert decode_image(body, max_pixels=LIMIT).size == (20, 40)


def gradient(width: int, height: int) -> Image.Image:
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :, None]
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None, None]
    return Image.fromarray(np.concatenate([np.broadcast_to(x, (height, width, 1)), np.broadcast_to(y, (height, width, 1)),
                                           np.full((height, width, 1), 128, np.float32)], axis=2).astype(np.uint8))


def test_large_jpegs_decode_at_a_reduced_scale_never_below_the_resize() -> None:
    big = gradient(2400, 1600)
    body = encode(big, "JPEG", quality=90)
    reduced = decode_image(body, max_pixels=LIMIT, min_side=256)
    assert reduced.size == (600, 400)  # 1/4 scale (1/8 would be 200 px, below 256)
    assert decode_image(body, max_pixels=LIMIT).size == (2400, 1600)
    # The same picture: resized to the model's input both ways, the pixels barely differ.
    a = np.asarray(big.resize((384, 256), Image.BILINEAR, reducing_gap=None), dtype=np.float32)
    b = np.asarray(reduced.resize((384, 256), Image.BILINEAR), dtype=np.float32)
    assert np.abs(a - b).mean() < 3.0
    # Small JPEGs and other formats are decoded as they are; EXIF orientation still applies.
    assert decode_image(encode(gradient(400, 300), "JPEG"), max_pixels=LIMIT, min_side=256).size == (400, 300)
    assert decode_image(encode(big, "PNG"), max_pixels=LIMIT, min_side=256).size == (2400, 1600)
    exif = Image.Exif()
    exif[0x0112] = 6
    assert decode_image(encode(big, "JPEG", exif=exif), max_pixels=LIMIT, min_side=256).size == (400, 600)
    assert decoded(body, "image/jpeg", min_side=256).images[0].size == (600, 400)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"", "empty"),
        (b"not an image at all", "not an image"),
        (encode(Image.new("RGB", (64, 64)), "JPEG")[:200], "could not be decoded"),
    ],
)
def test_undecodable_bodies_are_invalid_images(body: bytes, message: str) -> None:
    with pytest.raises(InvalidImage, match=message):
        decode_image(body, max_pixels=LIMIT)


def test_decompression_bombs_are_refused_before_decoding() -> None:
    body = encode(Image.new("L", (2000, 2000)), "PNG")
    with pytest.raises(InvalidImage, match="2000x2000 pixels; the limit is 1000000"):
        decode_image(body, max_pixels=1_000_000)


def test_unsupported_content_type() -> None:
    with pytest.raises(UnsupportedMediaType, match="text/plain"):
        decoded(b"hello", "text/plain")


def test_json_instances_in_every_shape() -> None:
    body = json.dumps({"instances": [{"b64": b64(PNG)}, b64(PNG)]}).encode()
    inputs = decoded(body, "application/json")
    assert (len(inputs), inputs.single) == (2, False)
    one = decoded(json.dumps({"b64": b64(PNG)}).encode(), "application/json")
    assert (len(one), one.single) == (1, True)


@pytest.mark.parametrize(
    ("body", "error", "message"),
    [
        (b"{not json", InvalidJson, "not valid JSON"),
        (b'{"instances": {"b64": "x"}}', BadRequest, "must be a list"),
        (b'{"instances": []}', BadRequest, "no instances"),
        (b'{"instances": [{"b64": "@@@"}]}', InvalidBase64, "instance 0: not valid base64"),
        (b'{"instances": [{"url": "http://169.254.169.254/"}]}', BadRequest, "instance 0: expected"),
        (b'{"instances": [{"s3_uri": "s3://bucket/key"}]}', BadRequest, "S3 references are not enabled"),
        (json.dumps({"instances": [b64(PNG), b64(b"junk")]}).encode(), InvalidImage, "instance 1"),
    ],
)
def test_bad_json_requests_name_the_problem(body: bytes, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        decoded(body, "application/json")


def test_batch_too_large() -> None:
    body = json.dumps({"instances": [b64(PNG)] * 3}).encode()
    with pytest.raises(BatchTooLarge, match="3 instances; the limit is 2"):
        decoded(body, "application/json", max_instances=2)


def test_json_lines_records_in_order() -> None:
    body = f'{{"b64": "{b64(PNG)}"}}\n\n"{b64(encode(Image.new("RGB", (3, 3))))}"\n'.encode()
    inputs = decoded(body, "application/jsonlines")
    assert inputs.lines and [image.size for image in inputs.images] == [(8, 6), (3, 3)]
    with pytest.raises(InvalidJson, match="line 2"):
        decoded(b'"x"\n{oops\n', "application/jsonlines")


def test_npy_tensors() -> None:
    buffer = io.BytesIO()
    np.save(buffer, np.zeros((3, 4, 4), dtype=np.float64))
    inputs = decoded(buffer.getvalue(), "application/x-npy")
    assert inputs.tensor is not None and inputs.tensor.shape == (1, 3, 4, 4) and inputs.tensor.dtype == np.float32
    for bad in (np.zeros((4, 4)), np.zeros((2, 4, 4, 4)), np.array(["a"])):
        buffer = io.BytesIO()
        np.save(buffer, bad)
        with pytest.raises(InvalidTensor):
            decoded(buffer.getvalue(), "application/x-npy")
    with pytest.raises(InvalidTensor, match="not a .npy array"):
        decoded(b"garbage", "application/x-npy")


def test_pickled_npy_is_refused() -> None:
    buffer = io.BytesIO()
    np.save(buffer, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(InvalidTensor):
        decoded(buffer.getvalue(), "application/x-npy")


@pytest.mark.parametrize(
    ("accept", "lines", "expected"),
    [
        (None, False, codec.JSON), ("", False, codec.JSON), ("*/*", False, codec.JSON),
        ("text/html, application/*;q=0.5", False, codec.JSON), ("text/csv", False, codec.CSV),
        ("application/x-npy", False, codec.NPY), ("application/jsonlines", False, codec.JSON_LINES),
        (None, True, codec.JSON_LINES), ("application/json", True, codec.JSON),
    ],
)
def test_response_type_follows_accept(accept: str | None, lines: bool, expected: str) -> None:
    assert choose_response_type(accept, lines=lines) == expected


def test_unsupported_accept() -> None:
    with pytest.raises(NotAcceptable, match="text/html"):
        choose_response_type("text/html")


@pytest.mark.parametrize(
    ("header", "expected"),
    [(None, Options(5)), ("top_k=2", Options(2, ranked=True)), ("raw=true; top_k=1", Options(1, True, ranked=True)),
     ("anything else,raw=0", Options(5, False))],
)
def test_custom_attributes(header: str | None, expected: Options) -> None:
    assert parse_options(header, default_top_k=5) == expected


@pytest.mark.parametrize("header", ["top_k=0", "top_k=x", "raw=maybe", "top_k=\u00b2", "top_k=\u0663",
                                    "top_k=" + "9" * 30])
def test_bad_custom_attributes(header: str) -> None:
    with pytest.raises(BadRequest, match="custom attribute"):
        parse_options(header, default_top_k=5)


LOGITS = np.array([[0.0, 2.0, 1.0], [3.0, 0.0, 0.0]], dtype=np.float32)
NAMES = ("a", "b, with comma", "c")


def test_encodings() -> None:
    many = Inputs(images=(Image.new("RGB", (1, 1)),) * 2, single=False)
    body = json.loads(codec.encode(LOGITS, NAMES, inputs=many, options=Options(2), response_type=codec.JSON))
    assert [[p["index"] for p in row] for row in body["predictions"]] == [[1, 2], [0, 1]]
    assert body["predictions"][0][0]["probability"] == pytest.approx(np.exp(2) / (1 + np.exp(2) + np.exp(1)), abs=1e-6)
    raw = json.loads(codec.encode(LOGITS, NAMES, inputs=many, options=Options(1, True), response_type=codec.JSON))
    assert raw["logits"] == [[0.0, 2.0, 1.0], [3.0, 0.0, 0.0]]
    rows = list(csv.reader(io.StringIO(codec.encode(LOGITS, NAMES, inputs=many, options=Options(2),
                                                    response_type=codec.CSV).decode())))
    assert [row[0] for row in rows] == ["b, with comma", "a"] and len(rows[0]) == 4
    lines = codec.encode(LOGITS, NAMES, inputs=many, options=Options(1), response_type=codec.JSON_LINES)
    assert [json.loads(line)["predictions"][0]["label"] for line in lines.splitlines()] == ["b, with comma", "a"]
    array = np.load(io.BytesIO(codec.encode(LOGITS, NAMES, inputs=many, options=Options(1), response_type=codec.NPY)))
    np.testing.assert_array_equal(array, LOGITS)
    single = json.loads(codec.encode(LOGITS[:1], NAMES, inputs=Inputs(images=(Image.new("RGB", (1, 1)),)),
                                     options=Options(3), response_type=codec.JSON))
    assert [p["label"] for p in single["predictions"]] == ["b, with comma", "c", "a"]


def test_a_requests_pixels_are_counted_from_headers_and_refused_before_any_decoding(monkeypatch) -> None:
    """A few kilobytes of one-bit PNG decode to 40 megapixels: the body size says nothing."""
    bitmap = encode(Image.new("1", (5000, 8000)), "PNG")
    assert len(bitmap) < 10_000
    finished = []
    monkeypatch.setattr(codec, "_finish", lambda image, *rest: finished.append(image) or image)
    body = json.dumps({"instances": [{"b64": b64(bitmap)}] * 32}).encode()
    with pytest.raises(ImagesTooLarge) as refused:
        decode(body, "application/json", max_pixels=40_000_000, max_instances=64, max_request_pixels=160_000_000)
    assert refused.value.status == 413
    assert "32 images decode to 1280000000 pixels" in refused.value.message
    assert finished == []


def test_a_large_jpeg_counts_the_pixels_it_decodes_to_at_reduced_scale() -> None:
    photo = encode(Image.new("RGB", (4000, 3000), "green"), "JPEG")
    assert codec.decoded_pixels(photo, max_pixels=LIMIT * 2) == 4000 * 3000
    assert codec.decoded_pixels(photo, max_pixels=LIMIT * 2, min_side=256) == 500 * 375
    assert codec.decoded_pixels(b"not an image", max_pixels=LIMIT) is None


def test_each_image_is_prepared_as_soon_as_it_is_decoded() -> None:
    """Only one full-size image exists at a time: the next is decoded after the last is prepared."""
    events = []

    class Gate(MemoryGate):
        def hold(self, nbytes):
            events.append("decode")
            return super().hold(nbytes)

    def prepare(image):
        events.append("prepare")
        return image.size

    body = json.dumps({"instances": [b64(encode(Image.new("L", (30 + i, 20)), "PNG")) for i in range(3)]}).encode()
    inputs = decode(body, "application/json", max_pixels=LIMIT, max_instances=8, gate=Gate(10**9), prepare=prepare)
    assert inputs.images == ((30, 20), (31, 20), (32, 20))
    assert events == ["decode", "prepare"] * 3


def test_decoding_holds_its_estimated_memory_from_the_gate() -> None:
    held = []

    class Gate(MemoryGate):
        def hold(self, nbytes):
            held.append(nbytes)
            return super().hold(nbytes)

    gate = Gate(1 << 30)
    decode_image(encode(Image.new("I;16", (100, 50)), "PNG"), max_pixels=LIMIT, gate=gate)
    assert held == [100 * 50 * BYTES_PER_DECODED_PIXEL]
    assert gate.held == 0


def npy_with_header(header: str) -> bytes:
    text = header.encode("latin1")
    text += b" " * (-(len(text) + 11) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + len(text).to_bytes(2, "little") + text


@pytest.mark.parametrize("header", [
    "{'descr': '<f4', 'fortran_order': False, 'shape': (1, 3, -5, 2), }",
    "{'descr': '<f4', 'fortran_order': False, 'shape': (99999999999, 3, 99999999, 2), }",
    "{'descr': __import__('os').getcwd(), 'fortran_order': False, 'shape': (1,), }",
    "{'descr': '<f4', 'fortran_order': False, 'shape': (1, 3, 2, 2)",
    "{'descr': 17, 'fortran_order': False, 'shape': (1, 3, 2, 2), }",
])
def test_crafted_npy_headers_are_invalid_tensors(header: str) -> None:
    with pytest.raises(InvalidTensor):
        decoded(npy_with_header(header), "application/x-npy")


def test_deeply_nested_json_is_invalid_json_not_a_crash() -> None:
    deep = b"[" * 200_000 + b"]" * 200_000
    for content_type in ("application/json", "application/jsonlines"):
        with pytest.raises(InvalidJson):
            decoded(deep, content_type)


def test_non_finite_logits_still_give_valid_json() -> None:
    logits = np.array([[np.nan, 1.0, np.inf]], dtype=np.float32)
    body = codec.encode(logits, ("a", "b", "c"), inputs=Inputs(images=(Image.new("RGB", (1, 1)),)),
                        options=Options(3, raw=True), response_type=codec.JSON)
    document = json.loads(body, parse_constant=lambda name: pytest.fail(f"{name} is not JSON"))
    assert document["logits"] == [None, 1.0, None]
    assert all(p["probability"] is None for p in document["predictions"])


def test_a_multi_label_model_answers_every_class_over_its_threshold() -> None:
    logits = np.array([[2.0, 1.0, -3.0], [-2.0, -1.0, -4.0], [0.0, 3.0, 0.5]], dtype=np.float32)
    thresholds = (0.5, 0.7, 0.6)  # class 1 at sigmoid(1.0) = 0.731 reaches 0.7; sigmoid(0.5) = 0.622 reaches 0.6
    answers = codec.over_thresholds(logits, NAMES[:3], thresholds)
    assert [[(p.label, p.index) for p in row] for row in answers] == [
        [(NAMES[0], 0), (NAMES[1], 1)], [], [(NAMES[1], 1), (NAMES[2], 2), (NAMES[0], 0)]]  # 0.5 reaches 0.5
    assert answers[0][0].probability == pytest.approx(1 / (1 + np.exp(-2.0)), abs=1e-6)
    many = Inputs(images=(Image.new("RGB", (1, 1)),) * 3, single=False)
    body = json.loads(codec.encode(logits, NAMES[:3], inputs=many, options=Options(5), response_type=codec.JSON,
                                   thresholds=thresholds))
    assert [[p["label"] for p in row] for row in body["predictions"]] == [
        [NAMES[0], NAMES[1]], [], [NAMES[1], NAMES[2], NAMES[0]]]
    # top_k asked for: the k most probable, whatever their thresholds
    ranked = json.loads(codec.encode(logits, NAMES[:3], inputs=many, options=parse_options("top_k=2", default_top_k=5),
                                     response_type=codec.JSON, thresholds=thresholds))
    assert [[p["label"] for p in row] for row in ranked["predictions"]] == [
        [NAMES[0], NAMES[1]], [NAMES[1], NAMES[0]], [NAMES[1], NAMES[2]]]
