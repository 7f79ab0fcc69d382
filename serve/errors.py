"""The errors a client can cause or meet, each with its HTTP status and a stable code."""

from __future__ import annotations

from http import HTTPStatus
from typing import Any


class ServingError(Exception):
    status: HTTPStatus = HTTPStatus.INTERNAL_SERVER_ERROR
    code = "internal_error"

    def __init__(self, message: str | None = None, *, headers: dict[str, str] | None = None) -> None:
        self.message = message or self.status.phrase
        self.headers = headers or {}
        super().__init__(self.message)

    def body(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message}}


class BadRequest(ServingError):
    status = HTTPStatus.BAD_REQUEST
    code = "bad_request"


class InvalidImage(BadRequest):
    code = "invalid_image"


class InvalidJson(BadRequest):
    code = "invalid_json"


class InvalidBase64(BadRequest):
    code = "invalid_base64"


class InvalidTensor(BadRequest):
    code = "invalid_tensor"


class BatchTooLarge(BadRequest):
    code = "batch_too_large"


class Forbidden(ServingError):
    status = HTTPStatus.FORBIDDEN
    code = "forbidden"


class RequestTimeout(ServingError):
    """The request's body did not arrive in time."""

    status = HTTPStatus.REQUEST_TIMEOUT
    code = "request_timeout"


class HeadersTooLarge(ServingError):
    status = HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE
    code = "headers_too_large"


class PayloadTooLarge(ServingError):
    status = HTTPStatus.REQUEST_ENTITY_TOO_LARGE
    code = "payload_too_large"


class ImagesTooLarge(PayloadTooLarge):
    """The request's images would decode to more pixels than one request may use."""

    code = "images_too_large"


class UnsupportedMediaType(ServingError):
    status = HTTPStatus.UNSUPPORTED_MEDIA_TYPE
    code = "unsupported_media_type"


class NotAcceptable(ServingError):
    status = HTTPStatus.NOT_ACCEPTABLE
    code = "not_acceptable"


class NotReady(ServingError):
    status = HTTPStatus.SERVICE_UNAVAILABLE
    code = "model_not_ready"


class Overloaded(ServingError):
    status = HTTPStatus.SERVICE_UNAVAILABLE
    code = "overloaded"


class TooManyConnections(Overloaded):
    code = "too_many_connections"


class Timeout(ServingError):
    status = HTTPStatus.GATEWAY_TIMEOUT
    code = "timeout"


class InvalidModel(BadRequest):
    code = "invalid_model"


class ModelNotFound(ServingError):
    status = HTTPStatus.NOT_FOUND
    code = "model_not_found"


class ModelAlreadyLoaded(ServingError):
    status = HTTPStatus.CONFLICT
    code = "model_already_loaded"


class InsufficientStorage(ServingError):
    """No disk space for a request body streamed to disk."""

    status = HTTPStatus.INSUFFICIENT_STORAGE
    code = "insufficient_storage"


class InsufficientMemory(ServingError):
    status = HTTPStatus.INSUFFICIENT_STORAGE  # 507: what SageMaker's multi-model API expects
    code = "insufficient_memory"
