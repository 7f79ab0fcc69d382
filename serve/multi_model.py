"""SageMaker's multi-model container API: load, list, describe, unload and invoke models by name.

    POST   /models                 {"model_name": "...", "url": "/opt/ml/models/<name>/model"}
                                   200 loaded; 409 already loaded; 507 no memory; 400 neither an
                                   artifact nor code/inference.py;
                                   403 url outside the models folder (CLASSIFIER_MODELS_ROOT);
                                   415 not JSON; 413 body over 64 KB
    GET    /models                 {"models": [{"modelName", "modelUrl", ...}], "nextPageToken"}
                                   (query: next_page_token, page_size)
    GET    /models/{name}          {"modelName", "modelUrl", ...}; 404 when not loaded
    DELETE /models/{name}          200 unloaded (requests already queued still get answers); 404
    POST   /models/{name}/invoke   as /invocations, for that model; 404 when not loaded

``model_name`` is opaque; SageMaker also sends the caller's ``TargetModel`` in the
``X-Amzn-SageMaker-Target-Model`` header, which is only logged here.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response

from serve import codec
from serve.admission import read_body
from serve.errors import BadRequest, InvalidJson, UnsupportedMediaType
from serve.registry import LoadedModel, ModelRegistry

logger = logging.getLogger(__name__)
TARGET_MODEL_HEADER = "x-amzn-sagemaker-target-model"
MAX_LOAD_BODY = 64 * 1024
LOAD_EXAMPLE = {"model_name": "dogs", "url": "/opt/ml/models/dogs/model"}


def _load_request(body: bytes) -> tuple[str, str]:
    try:
        document = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidJson(f"the body is not valid JSON: {exc}") from None
    if not isinstance(document, dict):
        raise BadRequest(f'expected {json.dumps(LOAD_EXAMPLE)}')
    name, url = document.get("model_name"), document.get("url")
    if not isinstance(name, str) or not name.strip():
        raise BadRequest('"model_name" must be a non-empty string')
    if "/" in name:  # it names a path segment: /models/<name>/invoke
        raise BadRequest(f'"model_name" {name!r} must not contain "/"')
    if not isinstance(url, str) or not url.strip():
        raise BadRequest('"url" must be the path of the folder that holds the model')
    return name, url


def models_router(registry: ModelRegistry, classify: Callable[[Request, LoadedModel], Awaitable[Response]], *,
                  body_timeout_s: float, openapi_extra: dict[str, Any] | None = None) -> APIRouter:
    router = APIRouter(prefix="/models", tags=["multi-model"])

    @router.post("", summary="Load a model", openapi_extra={"requestBody": {
        "required": True, "content": {"application/json": {"example": LOAD_EXAMPLE}}}})
    async def load(request: Request) -> JSONResponse:
        content_type = request.headers.get("content-type")
        if content_type and codec.media_type(content_type) != codec.JSON:
            raise UnsupportedMediaType(f"a load request is {codec.JSON}, not {content_type!r}: {json.dumps(LOAD_EXAMPLE)}")
        name, url = _load_request(await read_body(request, MAX_LOAD_BODY, body_timeout_s))
        loaded = await registry.load(name, url)
        return JSONResponse({"status": f"model {name!r} loaded", **loaded.describe()})

    @router.get("", summary="List loaded models, one page at a time")
    async def list_models(next_page_token: str | None = None,
                          page_size: int = Query(default=100, ge=1, le=1000)) -> JSONResponse:
        models, token = registry.page(next_page_token, page_size)
        body: dict[str, Any] = {"models": models}
        if token is not None:
            body["nextPageToken"] = token
        return JSONResponse(body)

    @router.get("/{name}", summary="Describe a loaded model")
    async def describe(name: str) -> JSONResponse:
        return JSONResponse(registry.describe(name))

    @router.delete("/{name}", summary="Unload a model")
    async def unload(name: str) -> JSONResponse:
        await registry.unload(name)
        return JSONResponse({"status": f"model {name!r} unloaded"})

    @router.post("/{name}/invoke", summary="Classify images with a loaded model", openapi_extra=openapi_extra)
    async def invoke(name: str, request: Request) -> Response:
        return await classify(request, registry.get(name))

    return router
