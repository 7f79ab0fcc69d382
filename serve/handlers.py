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

Batched handlers (``CLASSIFIER_HANDLER_BATCHING``, opt-in): ``input_fn`` returns a tensor whose first
dimension counts the request's rows; the server concatenates several requests' tensors (same
trailing shape and type) into one ``predict_fn`` call, which returns one row per input row, and
hands each request its own rows for ``output_fn``. ``predict_fn`` then sees a context without
request headers: the call serves several requests.
"""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import io
import json
import logging
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch

from classifier import artifact
from serve.errors import BadRequest, NotAcceptable, ServingError, UnsupportedMediaType
from serve.memory import model_bytes
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


@contextlib.contextmanager
def _private_code(folder: Path) -> Iterator[None]:
    """Around importing one of several models' code and calling its ``model_fn`` (multi-model
    mode): its folder is on sys.path and its modules in sys.modules meanwhile (so ``model_fn`` can
    unpickle objects whose classes live there), then both are as they were, so another model's
    ``utils.py`` is never taken for this one's. The module objects stay alive through the handlers."""
    saved_path, before = list(sys.path), set(sys.modules)
    sys.path.insert(0, str(folder))
    root = folder.resolve()

    def from_folder(module: ModuleType) -> bool:
        places = [getattr(module, "__file__", None), *(getattr(module, "__path__", None) or ())]
        return any(place and Path(place).resolve().is_relative_to(root) for place in places)

    try:
        yield
    finally:
        sys.path[:] = saved_path
        for key in set(sys.modules) - before:
            module = sys.modules.get(key)
            if module is not None and from_folder(module):
                del sys.modules[key]


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

    def __init__(self, module: ModuleType | None, model_dir: Path, *, default_accept: str = JSON,
                 batching: bool = False, program: str = f"code/{DEFAULT_PROGRAM}") -> None:
        self.model_dir = model_dir
        self.program = program  # the handler module, as GET /models/<name> names it
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.default_accept = default_accept
        self.batching = batching
        self.functions = {name: getattr(module, name) for name in HANDLER_NAMES
                          if module is not None and callable(getattr(module, name, None))}
        if "transform_fn" in self.functions and {"input_fn", "predict_fn", "output_fn"} & set(self.functions):
            raise ValueError("inference.py defines transform_fn and also input_fn, predict_fn or output_fn: "
                             "transform_fn replaces those three, so define one or the other")
        if batching and "transform_fn" in self.functions:
            raise ValueError("CLASSIFIER_HANDLER_BATCHING needs input_fn, predict_fn and output_fn (or their "
                             "defaults): transform_fn handles a whole request in one call, so requests cannot "
                             "share its forward passes")
        self.takes_context = {name: _with_context(function, name) for name, function in self.functions.items()}
        self.model = self._call("model_fn", str(model_dir), context=self.context()) if "model_fn" in self.functions \
            else self._load_torchscript()
        if "predict_fn" not in self.functions and isinstance(self.model, torch.nn.Module):
            self.model = self.model.to(self.device)  # the default predict_fn runs it where input_fn put the data

    @classmethod
    def load(cls, model_dir: Path, *, program: str | None = None, submit_directory: str | None = None,
             default_accept: str = JSON, module_name: str = "inference", install: bool = True,
             private: bool = False, batching: bool = False) -> HandlerModel:
        """Install the code's requirements (unless ``install`` is false: the entry point did already),
        import it and call its ``model_fn``. ``private``: one of several models (see :func:`_private_code`)."""
        code = code_folder(model_dir, program, submit_directory)
        path = code / (program or DEFAULT_PROGRAM)
        if not path.is_file():
            raise FileNotFoundError(f"SAGEMAKER_PROGRAM names {path.name!r}, which is not in the model's code/ "
                                    f"(PyTorchModel(entry_point=...) puts it there)")
        if install:
            install_requirements(code)
        with _private_code(code) if private else contextlib.nullcontext():
            module = _import(path, module_name)
            logger.info("serving %s through %s (%s)%s", model_dir.name, path.name,
                        ", ".join(name for name in HANDLER_NAMES if hasattr(module, name)) or "default handlers",
                        ", requests batched" if batching else "")
            return cls(module, model_dir, default_accept=default_accept, batching=batching,
                       program=path.relative_to(model_dir).as_posix() if path.is_relative_to(model_dir) else path.name)

    @property
    def weight_bytes(self) -> int:
        """What the model's parameters and buffers occupy, when model_fn returned a torch module (else 0)."""
        return model_bytes(self.model) if isinstance(self.model, torch.nn.Module) else 0

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
        if "transform_fn" in self.functions:
            result = self._user("transform_fn", self.model, _as_received(body, content_type), content_type,
                                self.accepting(accept), context=context)
            answer, answer_type = result if isinstance(result, tuple) else (result, self.accepting(accept))
            return _as_bytes(answer), answer_type
        inputs = self.prepare(body, content_type, context)
        return self.respond(self.predict(inputs, context), accept, context)

    def accepting(self, accept: str | None) -> str:
        """``accept`` as the handlers see it: missing or ``*/*`` means the default, as in the framework container."""
        return self.default_accept if not accept or accept.strip() in ("*/*", "") else accept

    def prepare(self, body: bytes, content_type: str, context: Context) -> Any:
        """``input_fn``: the request body as the model's input."""
        data = _as_received(body, content_type)
        if "input_fn" not in self.functions:
            return default_input_fn(data, content_type, self.device)
        try:
            return self._call("input_fn", data, content_type, context=context)
        except ServingError:
            raise
        except INPUT_ERRORS as exc:
            raise InvalidInput(f"input_fn: {type(exc).__name__}: {exc}") from None
        except Exception as exc:
            raise _user_failure("input_fn", exc) from exc

    def predict(self, inputs: Any, context: Context) -> Any:
        """``predict_fn``: the model's prediction for ``inputs``."""
        if "predict_fn" in self.functions:
            return self._user("predict_fn", inputs, self.model, context=context)
        return self._guard("predict_fn", default_predict_fn, inputs, self.model, self.device)

    def respond(self, prediction: Any, accept: str | None, context: Context) -> tuple[bytes, str]:
        """``output_fn``: the response body for ``prediction`` and its content type."""
        accept = self.accepting(accept)
        if "output_fn" in self.functions:
            result = self._user("output_fn", prediction, accept, context=context)
            answer, answer_type = result if isinstance(result, tuple) else (result, accept)
            return _as_bytes(answer), answer_type
        chosen = first_accepted(accept, self.default_accept)
        return self._guard("output_fn", default_output_fn, prediction, chosen), chosen

    def batch_rows(self, inputs: Any) -> torch.Tensor | np.ndarray:
        """A request's ``input_fn`` result as rows for a shared ``predict_fn`` call (batched handlers)."""
        if isinstance(inputs, torch.Tensor | np.ndarray) and inputs.ndim > 0:
            if isinstance(inputs, np.ndarray) and inputs.dtype.kind not in "biufc":
                raise HandlerError(f"with CLASSIFIER_HANDLER_BATCHING, input_fn must return numeric rows; it returned "
                                   f"an array of {inputs.dtype}")
            return inputs
        kind = "a 0-d tensor or array" if isinstance(inputs, torch.Tensor | np.ndarray) else type(inputs).__name__
        raise HandlerError(f"with CLASSIFIER_HANDLER_BATCHING, input_fn must return a tensor or array whose first "
                           f"dimension counts the request's rows; it returned {kind}")

    def predict_batch(self, batch: torch.Tensor | np.ndarray) -> Rows:
        """``predict_fn`` over several requests' rows at once; what it returns, cut back into each
        request's rows by position (batched handlers)."""
        return Rows.of(self.predict(batch, self.context()), len(batch))

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


class Rows:
    """What a shared ``predict_fn`` returned, sliced per request as a batch is: a tensor, array or
    list with one entry per input row, or a tuple or dict of those (``(scores, features)``), each
    part cut along its first dimension."""

    def __init__(self, value: Any) -> None:
        self.value = value

    @classmethod
    def of(cls, prediction: Any, rows: int) -> Rows:
        parts = list(prediction.values()) if isinstance(prediction, dict) else \
            list(prediction) if isinstance(prediction, tuple) else [prediction]
        wrong = [count for count in map(_row_count, parts) if count != rows]
        if wrong:
            got = ", ".join("no rows" if count is None else f"{count} rows" for count in wrong)
            raise HandlerError(f"with CLASSIFIER_HANDLER_BATCHING, predict_fn must return one row per input row: a "
                               f"tensor, array or list of length {rows}, or a tuple or dict of those; it returned "
                               f"{type(prediction).__name__} with {got}")
        return cls(prediction)

    def __getitem__(self, rows: slice) -> Any:
        if isinstance(self.value, dict):
            return {key: part[rows] for key, part in self.value.items()}
        if isinstance(self.value, tuple):
            return tuple(part[rows] for part in self.value)
        return self.value[rows]


def _row_count(part: Any) -> int | None:
    """How many rows ``part`` has along its first dimension (None: it has none)."""
    if isinstance(part, torch.Tensor | np.ndarray):
        return len(part) if part.ndim > 0 else None
    return len(part) if isinstance(part, list) else None


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


def _as_received(body: bytes, content_type: str) -> str | bytes:
    """The body as input_fn receives it: ``str`` for JSON and CSV, ``bytes`` otherwise."""
    kind = content_type.split(";", 1)[0].strip().lower()
    return body.decode("utf-8", errors="replace") if kind in TEXT_TYPES else body


def _as_bytes(answer: Any) -> bytes:
    if isinstance(answer, bytes | bytearray | memoryview):
        return bytes(answer)
    if isinstance(answer, str):
        return answer.encode()
    return json.dumps(answer).encode()
