"""Request bytes to images, predictions to response bytes. No HTTP or model code here."""

from __future__ import annotations

import io
import json
import warnings
from collections.abc import Sequence
from typing import Any

from PIL import Image, ImageOps, UnidentifiedImageError

from serve.errors import InvalidImage, NotAcceptable, UnsupportedMediaType

JSON = "application/json"
# application/x-image is what SageMaker's own image algorithms and examples send.
IMAGE_TYPES = frozenset(
    {
        "application/x-image",
        "application/octet-stream",
        "image/jpeg",
        "image/jpg",
        "image/png",
        "image/webp",
        "image/gif",
        "image/bmp",
        "image/tiff",
    }
)


def media_type(header: str | None) -> str:
    """``"Image/PNG; charset=x"`` -> ``"image/png"``; empty string when absent."""
    return (header or "").split(";", 1)[0].strip().lower()


def decode_image(body: bytes, content_type: str | None, *, max_pixels: int) -> Image.Image:
    """Decode one image body into an upright RGB image."""
    kind = media_type(content_type) or "application/x-image"
    if kind not in IMAGE_TYPES:
        raise UnsupportedMediaType(
            f"content type {kind!r} is not supported; send one of: {', '.join(sorted(IMAGE_TYPES))}"
        )
    if not body:
        raise InvalidImage("the request body is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(body))
            width, height = image.size
            if width * height > max_pixels:
                raise InvalidImage(
                    f"image is {width}x{height} pixels; the limit is {max_pixels} pixels"
                )
            image.load()
            image = ImageOps.exif_transpose(image)
            return image.convert("RGB")
    except InvalidImage:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise InvalidImage("the body is not an image this server can decode") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise InvalidImage(f"the image could not be decoded: {exc}") from None


def choose_response_type(accept: str | None) -> str:
    """The media type to answer with, given an Accept header."""
    for part in (accept or "").split(","):
        kind = media_type(part)
        if kind in ("", "*/*", "application/*", JSON):
            return JSON
    raise NotAcceptable(f"cannot answer with {accept!r}; this server produces {JSON}")


def encode_predictions(predictions: Sequence[Any]) -> bytes:
    """Serialise one image's top-k predictions as JSON."""
    body = {"predictions": [p.to_dict() for p in predictions]}
    return json.dumps(body).encode()
