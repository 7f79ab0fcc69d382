"""The models a server holds, by name: the one model of single-model mode (added once it has
loaded), or in multi-model mode those loaded, listed and unloaded while the server runs.

This is the state behind SageMaker's multi-model container API (``POST /models`` and friends).
Each model gets its own :class:`~serve.batching.Batcher`; all of them share the server's
inference threads (warm-ups included), so models take turns on the cores instead of fighting
over them.

Memory policy. Before a load, the model's need is estimated from its weights file; it is loaded
only if that fits both the free memory measured right now (the container's cgroup or the host,
or the GPU, minus a reserve) and the optional budget for all models together. When it does not
fit, the least recently used models are unloaded one by one until it does (``evict=True``), or
the load is refused with 507 so that SageMaker unloads models itself (``evict=False``). A load
that could not fit even with every other model gone is refused at once, unloading nothing. A
loaded model is charged what its parameters and buffers occupy, and unloading one is credited
with that much (freed memory is not always visible to the next measurement at once).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import bisect
import collections
import gc
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from classifier import artifact
from serve import memory, user_code
from serve.batching import Batcher
from serve.errors import Forbidden, InsufficientMemory, InvalidModel, ModelAlreadyLoaded, ModelNotFound

if TYPE_CHECKING:
    from serve.handlers import HandlerModel
    from serve.predictor import Predictor

logger = logging.getLogger(__name__)
MEGABYTE = 1024 * 1024
# Loading briefly holds a second copy of some tensors and warm-up needs activations.
LOAD_OVERHEAD = 1.25
LOAD_EXTRA_BYTES = 32 * MEGABYTE


@dataclass
class LoadedModel:
    name: str
    url: str
    predictor: Predictor | HandlerModel
    batcher: Batcher | None  # None: served through its own handlers, one call per request
    footprint_bytes: int

    def describe(self) -> dict[str, object]:
        """The entry SageMaker's List/Get Model APIs expect, plus what this server knows."""
        about: dict[str, object] = {"modelName": self.name, "modelUrl": self.url}
        manifest = getattr(self.predictor, "manifest", None)
        if manifest is not None:
            about |= {"architecture": manifest.architecture, "classes": manifest.num_classes}
        else:
            about |= {"handlers": getattr(self.predictor, "program", None), "batched": self.batcher is not None}
        return about | {"memoryBytes": self.footprint_bytes}


def estimate_bytes(model_dir: Path) -> int:
    """What loading the model in ``model_dir`` is expected to take: from its network's files, or for
    a model served through its own code, from every file beside ``code/``."""
    if (model_dir / "code").is_dir():
        size = sum(path.stat().st_size for path in model_dir.rglob("*")
                   if path.is_file() and path.relative_to(model_dir).parts[0] != "code")
    else:
        size = sum(path.stat().st_size for path in artifact.network_files(model_dir))
    return int(size * LOAD_OVERHEAD) + LOAD_EXTRA_BYTES


def page_token(name: str) -> str:
    """An opaque token for "the page after ``name``": stable while models come and go."""
    return base64.urlsafe_b64encode(name.encode()).decode()


def after_token(token: str) -> str:
    try:
        return base64.b64decode(token.encode("ascii"), altchars=b"-_", validate=True).decode()
    except (binascii.Error, UnicodeError, ValueError):
        raise InvalidModel(f"next_page_token {token!r} is not one this server gave") from None


class ModelRegistry:
    def __init__(self, *, load: Callable[[Path], Predictor | HandlerModel] | None,
                 make_batcher: Callable[[Predictor | HandlerModel, str], Batcher | None],
                 warm_up: Callable[[Predictor | HandlerModel], None], device: torch.device,
                 budget_bytes: int | None = None, reserve_bytes: int = 0, evict: bool = True,
                 drain_timeout_s: float = 60.0, root: Path | None = None, program: str | None = None,
                 available: Callable[[torch.device], int | None] = memory.available_bytes) -> None:
        self._load = load  # None: models only join through add() (single-model mode)
        self._make_batcher = make_batcher
        self._warm_up = warm_up  # blocking: one inference where the model's requests will run
        self._device = device
        self._budget = budget_bytes
        self._reserve = reserve_bytes
        self._evict = evict
        self._drain_timeout_s = drain_timeout_s
        self._available = available
        self._root = root  # models load only from folders under this one (None: from anywhere)
        self._program = program  # the handler module a model's code/ may hold (SAGEMAKER_PROGRAM)
        self._models: collections.OrderedDict[str, LoadedModel] = collections.OrderedDict()  # oldest use first
        self._loading: set[str] = set()
        self._lock = asyncio.Lock()  # one load or unload at a time

    def _find(self, name: str) -> LoadedModel:
        model = self._models.get(name)
        if model is None:
            raise ModelNotFound(f"model {name!r} is not loaded")
        return model

    def get(self, name: str) -> LoadedModel:
        """The loaded model called ``name``, marked as just used."""
        model = self._find(name)
        self._models.move_to_end(name)
        return model

    def batchers(self) -> list[Batcher]:
        return [model.batcher for model in self._models.values() if model.batcher is not None]

    def describe(self, name: str) -> dict[str, object]:
        return self._find(name).describe()

    def page(self, token: str | None, size: int) -> tuple[list[dict[str, object]], str | None]:
        """One page of loaded models in name order, and the token of the next page (None at the end)."""
        names = sorted(self._models)
        start = bisect.bisect_right(names, after_token(token)) if token else 0
        chosen = names[start:start + size]
        more = start + size < len(names)
        return [self._models[name].describe() for name in chosen], (page_token(chosen[-1]) if more else None)

    async def load(self, name: str, url: str) -> LoadedModel:
        if name in self._models or name in self._loading:
            raise ModelAlreadyLoaded(f"model {name!r} is already loaded or loading")
        model_dir = self._folder(url)
        missing = [name for name, present in ((artifact.MANIFEST_FILE, artifact.is_artifact(model_dir)),
                                              (artifact.WEIGHTS_FILE, artifact.any_weights_file(model_dir)))
                   if not present]
        if missing and not user_code.has_own_code(model_dir, self._program):
            raise InvalidModel(f"{url!r} holds no model artifact (missing {' and '.join(missing)}) and no "
                               f"code/{self._program or user_code.DEFAULT_PROGRAM}")
        self._loading.add(name)
        try:
            async with self._lock:
                estimate = estimate_bytes(model_dir)
                await self._make_room(name, estimate)
                started = time.perf_counter()
                predictor = await self._load_warm(name, model_dir)
                loaded = self.add(name, url, predictor, estimate_bytes=estimate)
        finally:
            self._loading.discard(name)
        logger.info("loaded model %r from %s in %.2f s (%.1f MB)", name, url, time.perf_counter() - started,
                    loaded.footprint_bytes / MEGABYTE)
        return loaded

    def add(self, name: str, url: str, predictor: Predictor | HandlerModel, *, estimate_bytes: int = 0) -> LoadedModel:
        """``predictor`` (loaded and warmed up) served as ``name`` from now on, its batcher started.
        Charged what its tensors occupy, measured; a model that holds what this server cannot
        measure (model_fn returned something other than a torch module) at least its estimate."""
        if name in self._models:
            raise ModelAlreadyLoaded(f"model {name!r} is already loaded")
        batcher = self._make_batcher(predictor, name)
        if batcher is not None:
            batcher.start()
        loaded = LoadedModel(name, url, predictor, batcher, predictor.weight_bytes or estimate_bytes)
        self._models[name] = loaded
        return loaded

    def _folder(self, url: str) -> Path:
        """The folder ``url`` names, refused unless it lies under the models root (links resolved)."""
        folder = Path(url)
        if self._root is None:
            return folder
        resolved = folder.resolve()  # what is checked is what is loaded, even if a link changes later
        if not folder.is_absolute() or not resolved.is_relative_to(self._root.resolve()):
            raise Forbidden(f"{url!r} is not a folder under {str(self._root)!r}, where models are loaded from")
        return resolved

    async def unload(self, name: str) -> None:
        async with self._lock:
            if name not in self._models:
                raise ModelNotFound(f"model {name!r} is not loaded")
            await self._unload(name)

    async def close(self) -> None:
        for model in list(self._models.values()):
            if model.batcher is not None:
                await model.batcher.stop()
        self._models.clear()

    async def _load_warm(self, name: str, model_dir: Path) -> Predictor | HandlerModel:
        try:
            assert self._load is not None
            predictor = await asyncio.to_thread(self._load, model_dir)
            await asyncio.to_thread(self._warm_up, predictor)
        except (MemoryError, torch.OutOfMemoryError):
            raise InsufficientMemory(f"ran out of memory loading model {name!r}") from None
        except Exception as exc:  # a damaged or foreign artifact: the caller's problem, named
            logger.warning("model %r could not be loaded from %s", name, model_dir, exc_info=True)
            raise InvalidModel(f"model {name!r} could not be loaded from {str(model_dir)!r}: "
                               f"{type(exc).__name__}: {exc}") from None
        return predictor

    async def _unload(self, name: str) -> None:
        model = self._models.pop(name)  # new requests for it get 404 from here on
        if model.batcher is not None:
            await model.batcher.drain(self._drain_timeout_s)  # requests already queued still get their answers
        footprint = model.footprint_bytes
        del model
        gc.collect()
        if self._device.type == "cuda":
            torch.cuda.empty_cache()
        logger.info("unloaded model %r (%.1f MB)", name, footprint / MEGABYTE)

    def _used(self) -> int:
        return sum(model.footprint_bytes for model in self._models.values())

    def _shortfall(self, need: int, free: int | None) -> str | None:
        """Why ``need`` more bytes do not fit, or None when they do."""
        if self._budget is not None and self._used() + need > self._budget:
            return (f"the loaded models use {self._used() / MEGABYTE:.0f} MB of the {self._budget / MEGABYTE:.0f} MB "
                    f"budget and this one needs about {need / MEGABYTE:.0f} MB")
        if free is not None and free - self._reserve < need:
            return (f"{free / MEGABYTE:.0f} MB is free ({self._reserve / MEGABYTE:.0f} MB kept in reserve) and this "
                    f"model needs about {need / MEGABYTE:.0f} MB")
        return None

    async def _make_room(self, name: str, need: int) -> None:
        free = self._available(self._device)  # measured once; each unload below is credited its footprint
        reason = self._shortfall(need, free)
        if reason is None:
            return
        never = (self._budget is not None and need > self._budget) or (
            free is not None and free + self._used() - self._reserve < need)
        if not self._evict or not self._models or never:
            raise InsufficientMemory(f"cannot load model {name!r}: {reason}")
        while reason is not None and self._models:
            oldest = next(iter(self._models))
            logger.info("unloading least recently used model %r to make room for %r", oldest, name)
            freed = self._models[oldest].footprint_bytes
            await self._unload(oldest)
            if free is not None:
                free += freed
            reason = self._shortfall(need, free)
        if reason is not None:
            raise InsufficientMemory(f"cannot load model {name!r}: {reason}")
