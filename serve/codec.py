"""Request bytes to model inputs, model outputs to response bytes. No HTTP or model code here.

Request bodies (``Content-Type``):

- an image: ``image/jpeg``, ``image/png``, ``application/x-image``, ``application/octet-stream``,
  webp, gif (first frame), bmp, tiff — one image;
- ``application/json``: ``{"instances": [{"b64": "<base64>"}, {"s3_uri": "s3://bucket/key"}, "<base64>", ...]}``
  or one instance as the whole body (``{"b64": ...}``); S3 only for allowed buckets;
- ``application/jsonlines``: one instance per line (Batch Transform's MULTI_RECORD), answered
  one line per record, in order;
- ``application/x-npy``: a preprocessed float tensor, ``(3, H, W)`` or ``(N, 3, H, W)``.

Responses (``Accept``): ``application/json`` (default), ``application/jsonlines``, ``text/csv``
(one line per image: ``label,probability,label,probability,...``), ``application/x-npy``
(raw logits, ``(N, classes)`` float32).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import csv
import dataclasses
import io
import json
import math
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO

import numpy as np
from PIL import Image, UnidentifiedImageError

from classifier import images
from serve.admission import BYTES_PER_DECODED_PIXEL, MemoryGate
from serve.errors import (
    BadRequest,
    BatchTooLarge,
    ImagesTooLarge,
    InvalidBase64,
    InvalidImage,
    InvalidJson,
    InvalidTensor,
    NotAcceptable,
    PayloadTooLarge,
    UnsupportedMediaType,
)

JSON = "application/json"
JSON_LINES = "application/jsonlines"
CSV = "text/csv"
NPY = "application/x-npy"
JSON_LINES_ALIASES = frozenset({JSON_LINES, "application/x-jsonlines", "application/jsonl"})
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
REQUEST_TYPES = IMAGE_TYPES | {JSON, NPY} | JSON_LINES_ALIASES
# Pillow formats decoded from a file as it is read: the ones a body streamed to disk may be.
STREAMED_FORMATS = ("JPEG", "PNG", "GIF", "BMP", "TIFF")  # JPEG covers MPO
RESPONSE_TYPES = (JSON, JSON_LINES, CSV, NPY)


def media_type(header: str | None) -> str:
    """``"Image/PNG; charset=x"`` -> ``"image/png"``; empty string when absent."""
    return (header or "").split(";", 1)[0].strip().lower()


@dataclass(frozen=True)
class Options:
    """Per-request options from ``X-Amzn-SageMaker-Custom-Attributes`` (``top_k=3,raw=true``)."""

    top_k: int
    raw: bool = False
    ranked: bool = False  # top_k was asked for (a multi-label model then ranks, rather than thresholds)


def parse_options(header: str | None, *, default_top_k: int) -> Options:
    values: dict[str, str] = {}
    for part in (header or "").replace(";", ",").split(","):
        key, _, value = part.partition("=")
        if key.strip():
            values[key.strip().lower()] = value.strip()
    top_k, raw = default_top_k, False
    if "top_k" in values:
        if not re.fullmatch(r"[0-9]{1,9}", values["top_k"]) or int(values["top_k"]) < 1:
            raise BadRequest(f"custom attribute top_k={values['top_k']!r} must be a positive integer")
        top_k = int(values["top_k"])
    if "raw" in values:
        if values["raw"].lower() not in ("true", "false", "1", "0"):
            raise BadRequest(f"custom attribute raw={values['raw']!r} must be true or false")
        raw = values["raw"].lower() in ("true", "1")
    return Options(top_k=top_k, raw=raw, ranked="top_k" in values)


@dataclass(frozen=True)
class Inputs:
    """A decoded request: images (or what ``decode``'s ``prepare`` made of them) or a ready tensor,
    and how it was framed."""

    images: tuple[Any, ...] = ()
    tensor: np.ndarray | None = None
    single: bool = True  # a bare image or one-instance body: answer with one prediction list
    lines: bool = False  # JSON Lines in: one output record per input line

    def __len__(self) -> int:
        return len(self.images) if self.tensor is None else len(self.tensor)


def _open(body: bytes | BinaryIO, *, max_pixels: int, min_side: int | None) -> Image.Image:
    """Read the image's header only (from bytes, or from a file read as decoding goes); for a large
    JPEG, choose a reduced decoding scale.

    With ``min_side`` (the model's resize size), a JPEG much larger than needed is decoded at a
    reduced scale (see :func:`classifier.images.reduce_jpeg`; training's evaluation decodes the
    same way). ``image.size`` is then the size that will be decoded."""
    if isinstance(body, bytes) and not body:
        raise InvalidImage("the image is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            if isinstance(body, bytes):
                image = Image.open(io.BytesIO(body))
            else:  # only formats whose decoders read the file as they go (WebP and AVIF read it whole)
                image = Image.open(body, formats=STREAMED_FORMATS)
            width, height = image.size
            if width * height > max_pixels:
                raise InvalidImage(f"image is {width}x{height} pixels; the limit is {max_pixels} pixels")
            images.reduce_jpeg(image, min_side)
            return image
    except InvalidImage:
        raise
    except UnidentifiedImageError:
        if not isinstance(body, bytes):
            raise PayloadTooLarge(f"an image this large must be {', '.join(STREAMED_FORMATS[:-1])} or "
                                  f"{STREAMED_FORMATS[-1]}, which are decoded as they are read") from None
        raise InvalidImage("the body is not an image this server can decode") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise InvalidImage("the body is not an image this server can decode") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise InvalidImage(f"the image could not be decoded: {exc}") from None


def decoded_pixels(body: bytes, *, max_pixels: int, min_side: int | None = None) -> int | None:
    """How many pixels decoding ``body`` as one image would produce (None if it is no image)."""
    try:
        image = _open(body, max_pixels=max_pixels, min_side=min_side)
    except InvalidImage:
        return None
    return image.size[0] * image.size[1]


def _to_rgb(image: Image.Image) -> Image.Image:
    try:
        return images.upright_rgb(image)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise InvalidImage("the body is not an image this server can decode") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise InvalidImage(f"the image could not be decoded: {exc}") from None


def _finish(image: Image.Image, gate: MemoryGate | None, prepare: Callable[[Image.Image], Any] | None = None) -> Any:
    """Decode an opened image into an upright RGB image and pass it through ``prepare``, holding
    the memory this takes from ``gate`` until only the prepared result is left."""
    cost = image.size[0] * image.size[1] * BYTES_PER_DECODED_PIXEL
    with gate.hold(cost) if gate is not None else contextlib.nullcontext():
        decoded = _to_rgb(image)
        return prepare(decoded) if prepare is not None else decoded


def decode_image(body: bytes, *, max_pixels: int, min_side: int | None = None,
                 gate: MemoryGate | None = None) -> Image.Image:
    """Decode one image into an upright RGB image; refuse oversized ones before decoding
    (``min_side``: see :func:`_open`; ``gate``: see :mod:`serve.admission`)."""
    image: Image.Image = _finish(_open(body, max_pixels=max_pixels, min_side=min_side), gate)
    return image


def _instance_bytes(instance: Any, position: int, fetch_s3: Callable[[str], bytes] | None) -> bytes:
    if isinstance(instance, str):
        encoded = instance
    elif isinstance(instance, dict) and isinstance(instance.get("b64"), str):
        encoded = instance["b64"]
    elif isinstance(instance, dict) and isinstance(instance.get("s3_uri"), str):
        if fetch_s3 is None:
            raise BadRequest(f"instance {position}: S3 references are not enabled on this server")
        return fetch_s3(instance["s3_uri"])
    else:
        raise BadRequest(f'instance {position}: expected {{"b64": "<base64>"}}, {{"s3_uri": "s3://..."}} or a base64 string')
    try:
        return base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidBase64(f"instance {position}: not valid base64") from None


def _decode_instances(instances: Sequence[Any], *, limits: Limits, fetch_s3: Callable[[str], bytes] | None,
                      prepare: Callable[[Image.Image], Any] | None) -> tuple[Any, ...]:
    if not instances:
        raise BadRequest("the request holds no instances")
    if len(instances) > limits.max_instances:
        raise BatchTooLarge(f"the request holds {len(instances)} instances; the limit is {limits.max_instances}")
    opened: list[Image.Image] = []
    for position, instance in enumerate(instances):
        try:
            opened.append(_open(_instance_bytes(instance, position, fetch_s3), max_pixels=limits.max_pixels,
                                min_side=limits.min_side))
        except InvalidImage as exc:
            raise InvalidImage(f"instance {position}: {exc.message}") from None
    pixels = sum(image.size[0] * image.size[1] for image in opened)
    if limits.max_request_pixels is not None and pixels > limits.max_request_pixels:
        raise ImagesTooLarge(f"the request's {len(opened)} images decode to {pixels} pixels; the limit for one "
                             f"request is {limits.max_request_pixels} pixels")
    prepared = []
    opened.reverse()
    while opened:  # each full-size image is let go as soon as it is prepared
        position = len(prepared)
        try:
            prepared.append(_finish(opened.pop(), limits.gate, prepare))
        except InvalidImage as exc:
            raise InvalidImage(f"instance {position}: {exc.message}") from None
    return tuple(prepared)


def _decode_tensor(body: bytes, max_instances: int) -> np.ndarray:
    try:
        array = np.load(io.BytesIO(body), allow_pickle=False)
    except Exception as exc:  # noqa: BLE001 - a crafted header fails in many ways (even tokenize's); all are the body's fault
        raise InvalidTensor(f"the body is not a .npy array: {exc}") from None
    if not isinstance(array, np.ndarray) or array.dtype.kind not in "fiu":
        raise InvalidTensor("the .npy array must hold numbers")
    if array.ndim == 3:
        array = array[None]
    if array.ndim != 4 or array.shape[1] != 3:
        raise InvalidTensor(f"expected an array of shape (3, H, W) or (N, 3, H, W), got {array.shape}")
    if len(array) > max_instances:
        raise BatchTooLarge(f"the request holds {len(array)} images; the limit is {max_instances}")
    return np.ascontiguousarray(array, dtype=np.float32)


def is_one_image(content_type: str | None) -> bool:
    """Whether a body of this type is one encoded image (a missing type means one)."""
    return (media_type(content_type) or "application/x-image") in IMAGE_TYPES


@dataclass(frozen=True)
class Limits:
    """What one request may cost to decode."""

    max_pixels: int  # in one image
    max_instances: int  # images in one request
    max_request_pixels: int | None = None  # decoded pixels of all the request's images together
    min_side: int | None = None  # decode large JPEGs at a reduced scale down to this (see _open)
    gate: MemoryGate | None = None  # memory admission for full-size decodes (see serve.admission)


def decode(body: bytes | BinaryIO, content_type: str | None, *, max_pixels: int, max_instances: int,
           fetch_s3: Callable[[str], bytes] | None = None, min_side: int | None = None,
           max_request_pixels: int | None = None, gate: MemoryGate | None = None,
           prepare: Callable[[Image.Image], Any] | None = None) -> Inputs:
    """Decode a request body of any supported type.

    Each image is passed through ``prepare`` (e.g. the model's preprocessing) as soon as it is
    decoded, so that ``Inputs.images`` holds what ``prepare`` returns and no more than one
    full-size image exists at a time. The pixels of all images are counted from their headers,
    and refused above ``max_request_pixels``, before any is decoded. ``body`` may be an open file
    when it is one image (see :class:`serve.admission.SpooledBody`)."""
    limits = Limits(max_pixels=max_pixels, max_instances=max_instances, max_request_pixels=max_request_pixels,
                    min_side=min_side, gate=gate)
    kind = media_type(content_type) or "application/x-image"
    if kind in IMAGE_TYPES:
        return Inputs(images=(_finish(_open(body, max_pixels=max_pixels, min_side=min_side), gate, prepare),))
    if not isinstance(body, bytes):
        raise TypeError(f"a {kind} body is decoded from bytes, not from a file")
    if kind == NPY:
        return Inputs(tensor=_decode_tensor(body, max_instances), single=False)
    if kind == JSON:
        try:
            document = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
            raise InvalidJson(f"the body is not valid JSON: {exc}") from None
        if isinstance(document, dict) and "instances" in document:
            if not isinstance(document["instances"], list):
                raise BadRequest('"instances" must be a list')
            images = _decode_instances(document["instances"], limits=limits, fetch_s3=fetch_s3, prepare=prepare)
            return Inputs(images=images, single=False)
        return Inputs(images=_decode_instances([document], limits=dataclasses.replace(limits, max_instances=1),
                                               fetch_s3=fetch_s3, prepare=prepare))
    if kind in JSON_LINES_ALIASES:
        records = []
        for number, line in enumerate(body.splitlines(), start=1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
                    raise InvalidJson(f"line {number} is not valid JSON: {exc}") from None
        images = _decode_instances(records, limits=limits, fetch_s3=fetch_s3, prepare=prepare)
        return Inputs(images=images, single=False, lines=True)
    raise UnsupportedMediaType(
        f"content type {kind!r} is not supported; send one of: {', '.join(sorted(REQUEST_TYPES))}"
    )


def choose_response_type(accept: str | None, *, lines: bool = False) -> str:
    """The first supported type the client accepts, in the order it lists them."""
    default = JSON_LINES if lines else JSON
    for part in (accept or "").split(","):
        kind = media_type(part)
        if kind in ("", "*/*", "application/*"):
            return default
        if kind in JSON_LINES_ALIASES:
            return JSON_LINES
        if kind in RESPONSE_TYPES:
            return kind
        if kind == "text/*":
            return CSV
    raise NotAcceptable(f"cannot answer with {accept!r}; this server produces {', '.join(RESPONSE_TYPES)}")


def _finite(value: float) -> float | None:
    """A number for JSON: rounded, and null for NaN or infinity (which JSON cannot carry)."""
    number = float(value)
    return round(number, 6) if math.isfinite(number) else None


@dataclass(frozen=True)
class Prediction:
    label: str
    index: int
    probability: float | None

    def to_dict(self) -> dict[str, object]:
        return {"label": self.label, "index": self.index, "probability": self.probability}


def top_k(logits: np.ndarray, class_names: Sequence[str], k: int) -> list[list[Prediction]]:
    """Ranked predictions for each row of ``logits``."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    probabilities = np.exp(shifted)
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    k = min(k, logits.shape[1])
    if k < logits.shape[1]:
        # Only the k best need sorting: select them first (O(classes)), then order those.
        candidates = np.argpartition(-probabilities, k - 1, axis=1)[:, :k]
    else:
        candidates = np.broadcast_to(np.arange(k), (len(logits), k))
    ranked = []
    for row, chosen in zip(probabilities, candidates):
        # Highest probability first; equal ones by class index, as a stable sort would order them.
        order = sorted(chosen.tolist(), key=lambda i: (-row[i], i))
        ranked.append([Prediction(class_names[i], i, _finite(row[i])) for i in order])
    return ranked


def over_thresholds(logits: np.ndarray, class_names: Sequence[str], thresholds: Sequence[float],
                    k: int | None = None) -> list[list[Prediction]]:
    """A multi-label model's answers for each row of ``logits``: every class whose probability (the
    logit's sigmoid) reaches its threshold, most probable first; or, with ``k``, the ``k`` most
    probable whatever their thresholds."""
    with np.errstate(over="ignore"):
        probabilities = 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))
    limits = np.asarray(thresholds)
    answered = []
    for row in probabilities:
        chosen = range(len(row)) if k is not None else np.flatnonzero(row >= limits).tolist()
        order = sorted(chosen, key=lambda i: (-row[i], i))[:k]
        answered.append([Prediction(class_names[i], i, _finite(row[i])) for i in order])
    return answered


def encode(logits: np.ndarray, class_names: Sequence[str], *, inputs: Inputs, options: Options,
           response_type: str, thresholds: Sequence[float] | None = None) -> bytes:
    """Serialise the model's answer for ``inputs`` in ``response_type``: the ``top_k`` classes, or
    for a multi-label model (``thresholds``, one per class) the classes over their thresholds."""
    if response_type == NPY:
        buffer = io.BytesIO()
        np.save(buffer, logits.astype(np.float32), allow_pickle=False)
        return buffer.getvalue()
    if thresholds is None:
        ranked = top_k(logits, class_names, options.top_k)
    else:
        ranked = over_thresholds(logits, class_names, thresholds, options.top_k if options.ranked else None)
    if response_type == CSV:
        text = io.StringIO()
        writer = csv.writer(text, lineterminator="\n")
        for predictions in ranked:
            writer.writerow([value for p in predictions for value in (p.label, p.probability)])
        return text.getvalue().encode()
    records = []
    for row, predictions in zip(logits, ranked):
        record: dict[str, Any] = {"predictions": [p.to_dict() for p in predictions]}
        if options.raw:
            record["logits"] = [_finite(v) for v in row]
        records.append(record)
    if response_type == JSON_LINES:
        return "".join(json.dumps(record) + "\n" for record in records).encode()
    if inputs.single:
        return json.dumps(records[0]).encode()
    body: dict[str, Any] = {"predictions": [r["predictions"] for r in records]}
    if options.raw:
        body["logits"] = [r["logits"] for r in records]
    return json.dumps(body).encode()
