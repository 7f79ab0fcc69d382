"""Decoding request bodies into upright RGB images, and choosing the response type."""

from __future__ import annotations

import pytest
from imagedata import encode
from PIL import Image

from serve.codec import JSON, choose_response_type, decode_image
from serve.errors import InvalidImage, NotAcceptable, UnsupportedMediaType

LIMIT = 10_000_000


@pytest.mark.parametrize("content_type", ["image/png", "application/x-image", "Image/PNG; q=1", None])
def test_png_under_every_accepted_content_type(content_type: str | None) -> None:
    image = decode_image(encode(Image.new("RGB", (8, 6), "red")), content_type, max_pixels=LIMIT)
    assert (image.mode, image.size) == ("RGB", (8, 6))


@pytest.mark.parametrize(
    ("mode", "image_format"),
    [("L", "PNG"), ("RGBA", "PNG"), ("P", "PNG"), ("CMYK", "JPEG"), ("I;16", "PNG"), ("RGB", "WEBP"), ("RGB", "BMP")],
)
def test_modes_and_formats_become_rgb(mode: str, image_format: str) -> None:
    body = encode(Image.new(mode, (5, 4)), image_format)
    image = decode_image(body, "application/x-image", max_pixels=LIMIT)
    assert (image.mode, image.size) == ("RGB", (5, 4))


def test_exif_orientation_is_applied() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    body = encode(Image.new("RGB", (40, 20)), "JPEG", exif=exif)
    assert decode_image(body, "image/jpeg", max_pixels=LIMIT).size == (20, 40)


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
        decode_image(body, "image/jpeg", max_pixels=LIMIT)


def test_images_over_the_pixel_limit_are_refused_before_decoding() -> None:
    body = encode(Image.new("L", (2000, 2000)), "PNG")
    with pytest.raises(InvalidImage, match="2000x2000 pixels; the limit is 1000000"):
        decode_image(body, "image/png", max_pixels=1_000_000)


def test_unsupported_content_type() -> None:
    with pytest.raises(UnsupportedMediaType, match="text/plain"):
        decode_image(b"hello", "text/plain", max_pixels=LIMIT)


@pytest.mark.parametrize("accept", [None, "", "*/*", "application/json", "text/html, application/*;q=0.5"])
def test_json_answers_every_accept_that_allows_it(accept: str | None) -> None:
    assert choose_response_type(accept) == JSON


def test_unsupported_accept() -> None:
    with pytest.raises(NotAcceptable, match="text/html"):
        choose_response_type("text/html")
