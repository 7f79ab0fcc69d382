"""Handler mode: serve a model through the user's own ``inference.py``, as SageMaker's PyTorch
framework container does.

The model folder holds ``code/inference.py`` (``PyTorchModel(entry_point="inference.py", ...)``
puts it there and sets ``SAGEMAKER_PROGRAM``). Its functions, each optional:

- ``model_fn(model_dir)`` -> model; default: ``torch.jit.load(model_dir / "model.pt")``;
- ``input_fn(body, content_type)`` -> data; default: JSON, CSV and NPY into a tensor;
- ``predict_fn(data, model)`` -> prediction; default: ``model(data)`` without gradients;
- ``output_fn(prediction, accept)`` -> body; default: JSON, CSV or NPY, as ``Accept`` asks;
- or ``transform_fn(model, body, content_type, accept)`` -> body or ``(body, content_type)``
  instead of the last three.

Each may take one more argument, ``context`` (see :class:`Context`). The body reaches ``input_fn``
as ``str`` for ``application/json`` and ``text/csv`` and as ``bytes`` otherwise, as there. Nothing
here knows HTTP: errors are :mod:`serve.errors` types that the app turns into JSON answers.
"""

from __future__ import annotations

import importlib.util
import inspect
import io
import json
import logging
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch

from classifier import artifact
from serve.errors import BadRequest, NotAcceptable, ServingError, UnsupportedMediaType
from serve.user_code import DEFAULT_PROGRAM, code_folder, has_handlers, install_requirements

__all__ = ["HandlerModel", "code_folder", "has_handlers", "install_requirements"]

logger = logging.getLogger(__name__)
JSON, CSV, NPY = "application/json", "text/csv", "application/x-npy"
TEXT_TYPES = frozenset({JSON, CSV})  # these reach input_fn as str
HANDLER_NAMES = ("model_fn", "input_fn", "predict_fn", "output_fn", "transform_fn")
ARITY = {"model_fn": 1, "input_fn": 2, "predict_fn": 2, "output_fn": 2, "transform_fn": 4}
# Raised by input_fn, these mean the request was malformed: answered 400, not 500.
INPUT_ERRORS = (ValueError, TypeError, KeyError, IndexError, UnicodeDecodeError)
HTTP_ERRORS = {status.value: status for status in HTTPStatus if 400 <= status.value <= 599}


class HandlerError(ServingError):
    """A user function failed for a reason of its own: 500, the traceback in the log."""

    code = "handler_error"


class InvalidInput(BadRequest):
    """``input_fn`` refused the request body."""

    code = "invalid_input"


@dataclass
class Context:
    """The ``context`` argument handlers may take (the subset of TorchServe's that applies here)."""

    model_dir: str
    gpu_id: int | None
    request_headers: Mapping[str, str] = field(default_factory=dict)
    model_name: str = "model"

    @property
    def system_properties(self) -> dict[str, Any]:
        return {"model_dir": self.model_dir, "gpu_id": self.gpu_id}

    def get_request_header(self, index: int, key: str) -> str | None:
        return self.request_headers.get(key.lower())

    def get_all_request_header(self, index: int) -> dict[str, str]:
        return dict(self.request_headers)


def _import(path: Path, name: str) -> ModuleType:
    """Import ``path`` as module ``name``, with its folder first on sys.path for its own imports."""
    folder = str(path.parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _with_context(function: Callable[..., Any], name: str) -> bool:
    """Whether ``function`` takes the optional ``context`` argument after its usual ones."""
    parameters = [p for p in inspect.signature(function).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(parameters) == ARITY[name]:
        return False
    if len(parameters) == ARITY[name] + 1:
        return True
    raise TypeError(f"{name} takes {len(parameters)} arguments; expected {ARITY[name]}, or {ARITY[name] + 1} "
                    "with context")


def first_accepted(accept: str | None, default: str) -> str:
    """The first type in ``accept`` that the default output_fn can produce."""
    for part in (accept or "").split(","):
        kind = part.split(";", 1)[0].strip().lower()
        if kind in ("", "*/*"):
            return default
        if kind in (JSON, CSV, NPY):
            return kind
    raise NotAcceptable(f"cannot answer with {accept!r}; the default output_fn produces {JSON}, {CSV} and {NPY}")


def default_input_fn(body: str | bytes, content_type: str, device: torch.device) -> torch.Tensor:
    kind = content_type.split(";", 1)[0].strip().lower()
    try:
        if kind == JSON:
            array = np.array(json.loads(body), dtype=np.float32)
        elif kind == CSV:
            text = body if isinstance(body, str) else body.decode()
            array = np.genfromtxt(io.StringIO(text), delimiter=",", dtype=np.float32)
        elif kind == NPY:
            array = np.load(io.BytesIO(body if isinstance(body, bytes) else body.encode()), allow_pickle=False)
        else:
            raise UnsupportedMediaType(f"content type {content_type!r} is not supported by the default input_fn; "
                                       f"send {JSON}, {CSV} or {NPY}, or define input_fn in inference.py")
    except (ValueError, OSError, EOFError) as exc:
        raise InvalidInput(f"the body is not valid {kind}: {exc}") from None
    return torch.from_numpy(np.ascontiguousarray(array)).to(device)


def default_predict_fn(data: Any, model: Any, device: torch.device) -> Any:
    with torch.no_grad():
        if isinstance(model, torch.nn.Module):
            model.eval()
        return model(data.to(device) if isinstance(data, torch.Tensor) else data)


def default_output_fn(prediction: Any, accept: str) -> bytes:
    if isinstance(prediction, torch.Tensor):
        prediction = prediction.detach().cpu().numpy()
    if accept == NPY:
        buffer = io.BytesIO()
        np.save(buffer, np.asarray(prediction), allow_pickle=False)
        return buffer.getvalue()
    if accept == CSV:
        buffer = io.StringIO()
        np.savetxt(buffer, np.atleast_2d(np.asarray(prediction)), delimiter=",", fmt="%s")
        return buffer.getvalue().encode()
    return json.dumps(prediction.tolist() if isinstance(prediction, np.ndarray) else prediction).encode()


class HandlerModel:
    """The user's model and functions, called in the framework container's order."""

    def __init__(self, module: ModuleType | None, model_dir: Path, *, default_accept: str = JSON) -> None:
        self.model_dir = model_dir
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.default_accept = default_accept
        self.functions = {name: getattr(module, name) for name in HANDLER_NAMES
                          if module is not None and callable(getattr(module, name, None))}
        if "transform_fn" in self.functions and {"input_fn", "predict_fn", "output_fn"} & set(self.functions):
            raise ValueError("inference.py defines transform_fn and also input_fn, predict_fn or output_fn: "
                             "transform_fn replaces those three, so define one or the other")
        self.takes_context = {name: _with_context(function, name) for name, function in self.functions.items()}
        self.model = self._call("model_fn", str(model_dir), context=self.context()) if "model_fn" in self.functions \
            else self._load_torchscript()
        if "predict_fn" not in self.functions and isinstance(self.model, torch.nn.Module):
            self.model = self.model.to(self.device)  # the default predict_fn runs it where input_fn put the data

    @classmethod
    def load(cls, model_dir: Path, *, program: str | None = None, submit_directory: str | None = None,
             default_accept: str = JSON, module_name: str = "inference", install: bool = True) -> HandlerModel:
        """Install the code's requirements (unless ``install`` is false: the entry point did already),
        import it and call its ``model_fn``."""
        code = code_folder(model_dir, program, submit_directory)
        path = code / (program or DEFAULT_PROGRAM)
        if not path.is_file():
            raise FileNotFoundError(f"SAGEMAKER_PROGRAM names {path.name!r}, which is not in the model's code/ "
                                    f"(PyTorchModel(entry_point=...) puts it there)")
        if install:
            install_requirements(code)
        module = _import(path, module_name)
        logger.info("serving through %s (%s)", path.name,
                    ", ".join(name for name in HANDLER_NAMES if hasattr(module, name)) or "default handlers")
        return cls(module, model_dir, default_accept=default_accept)

    def context(self, headers: Mapping[str, str] | None = None) -> Context:
        gpu = self.device.index if self.device.type == "cuda" else None
        return Context(str(self.model_dir), gpu if gpu is not None or self.device.type != "cuda" else 0,
                       dict(headers or {}))

    def _load_torchscript(self) -> Any:
        path = self.model_dir / "model.pt"
        if not path.is_file():
            raise FileNotFoundError("inference.py defines no model_fn and the model has no model.pt (TorchScript) "
                                    "for the default one to load")
        return artifact.load_torchscript(path, self.device)

    def _call(self, name: str, *args: Any, context: Context) -> Any:
        function = self.functions[name]
        return function(*args, context) if self.takes_context[name] else function(*args)

    def invoke(self, body: bytes, content_type: str, accept: str | None,
               headers: Mapping[str, str] | None = None) -> tuple[bytes, str]:
        """One request through the handlers: the response body and its content type."""
        context = self.context(headers)
        if not accept or accept.strip() in ("*/*", ""):
            accept = self.default_accept  # as the framework container: missing or */* means the default
        kind = content_type.split(";", 1)[0].strip().lower()
        data: str | bytes = body.decode("utf-8", errors="replace") if kind in TEXT_TYPES else body
        if "transform_fn" in self.functions:
            result = self._user("transform_fn", self.model, data, content_type, accept, context=context)
            answer, answer_type = result if isinstance(result, tuple) else (result, accept)
            return _as_bytes(answer), answer_type
        if "input_fn" in self.functions:
            try:
                inputs = self._call("input_fn", data, content_type, context=context)
            except ServingError:
                raise
            except INPUT_ERRORS as exc:
                raise InvalidInput(f"input_fn: {type(exc).__name__}: {exc}") from None
            except Exception as exc:
                raise _user_failure("input_fn", exc) from exc
        else:
            inputs = default_input_fn(data, content_type, self.device)
        if "predict_fn" in self.functions:
            prediction = self._user("predict_fn", inputs, self.model, context=context)
        else:
            prediction = self._guard("predict_fn", default_predict_fn, inputs, self.model, self.device)
        if "output_fn" in self.functions:
            result = self._user("output_fn", prediction, accept, context=context)
            answer, answer_type = result if isinstance(result, tuple) else (result, accept)
            return _as_bytes(answer), answer_type
        chosen = first_accepted(accept, self.default_accept)
        return self._guard("output_fn", default_output_fn, prediction, chosen), chosen

    def _user(self, name: str, *args: Any, context: Context) -> Any:
        return self._guard(name, self._call, name, *args, context=context)

    @staticmethod
    def _guard(name: str, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        except ServingError:
            raise
        except Exception as exc:
            raise _user_failure(name, exc) from exc


def _user_failure(name: str, exc: Exception) -> ServingError:
    """A ServingError for an exception from user code; one carrying its own 4xx/5xx status keeps it."""
    status = getattr(exc, "status_code", None)
    if isinstance(status, int) and status in HTTP_ERRORS:
        if status >= 500:
            logger.error("%s failed", name, exc_info=exc)
        error = HandlerError(f"{name}: {exc}")
        error.status = HTTP_ERRORS[status]
        return error
    logger.error("%s failed", name, exc_info=exc)
    return HandlerError(f"{name} failed: {type(exc).__name__}: {exc}")


def _as_bytes(answer: Any) -> bytes:
    if isinstance(answer, bytes | bytearray | memoryview):
        return bytes(answer)
    if isinstance(answer, str):
        return answer.encode()
    return json.dumps(answer).encode()
