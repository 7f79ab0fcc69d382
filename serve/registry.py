"""Multi-model mode: models loaded, listed and unloaded by name while the server runs.

This is the state behind SageMaker's multi-model container API (``POST /models`` and friends).
Each model gets its own :class:`~serve.batching.Batcher`; all of them share one inference thread,
so models take turns on the cores instead of fighting over them.

Memory policy. Before a load, the model's need is estimated from its weights file; it is loaded
only if that fits both the free memory measured right now (the container's cgroup or the host,
or the GPU, minus a reserve) and the optional budget for all models together. When it does not
fit, the least recently used models are unloaded one by one until it does (``evict=True``, the
default), or the load is refused with 507 so that SageMaker unloads models itself
(``evict=False``). A loaded model is charged what its parameters and buffers occupy.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from classifier import artifact
from serve import memory
from serve.batching import Batcher
from serve.errors import InsufficientMemory, InvalidModel, ModelAlreadyLoaded, ModelNotFound

if TYPE_CHECKING:
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
    predictor: Predictor
    batcher: Batcher
    footprint_bytes: int
    loaded_at: float = field(default_factory=time.time)

    def describe(self) -> dict[str, object]:
        """The entry SageMaker's List/Get Model APIs expect, plus what this server knows."""
        manifest = self.predictor.manifest
        return {"modelName": self.name, "modelUrl": self.url, "architecture": manifest.architecture,
                "classes": manifest.num_classes, "memoryBytes": self.footprint_bytes}


def estimate_bytes(model_dir: Path) -> int:
    """What loading the artifact in ``model_dir`` is expected to take."""
    weights = model_dir / artifact.WEIGHTS_FILE
    return int(weights.stat().st_size * LOAD_OVERHEAD) + LOAD_EXTRA_BYTES


class ModelRegistry:
    def __init__(self, *, load: Callable[[Path], Predictor], make_batcher: Callable[[Predictor], Batcher],
                 device: torch.device, budget_bytes: int | None = None, reserve_bytes: int = 0,
                 evict: bool = True, available: Callable[[torch.device], int | None] = memory.available_bytes) -> None:
        self._load = load
        self._make_batcher = make_batcher
        self._device = device
        self._budget = budget_bytes
        self._reserve = reserve_bytes
        self._evict = evict
        self._available = available
        self._models: collections.OrderedDict[str, LoadedModel] = collections.OrderedDict()  # oldest use first
        self._loading: set[str] = set()
        self._lock = asyncio.Lock()  # one load or unload at a time

    def __len__(self) -> int:
        return len(self._models)

    def get(self, name: str) -> LoadedModel:
        """The loaded model called ``name``, marked as just used."""
        model = self._models.get(name)
        if model is None:
            raise ModelNotFound(f"model {name!r} is not loaded")
        self._models.move_to_end(name)
        return model

    def describe(self, name: str) -> dict[str, object]:
        model = self._models.get(name)
        if model is None:
            raise ModelNotFound(f"model {name!r} is not loaded")
        return model.describe()

    def page(self, token: str | None, size: int) -> tuple[list[dict[str, object]], str | None]:
        """One page of loaded models in name order, and the token of the next page (None at the end)."""
        names = sorted(self._models)
        start = 0
        if token:
            if not token.isdigit() or int(token) > len(names):
                raise InvalidModel(f"next_page_token {token!r} is not one this server gave")
            start = int(token)
        end = start + size
        return [self._models[name].describe() for name in names[start:end]], (str(end) if end < len(names) else None)

    async def load(self, name: str, url: str) -> LoadedModel:
        if name in self._models or name in self._loading:
            raise ModelAlreadyLoaded(f"model {name!r} is already loaded")
        model_dir = Path(url)
        if not artifact.is_artifact(model_dir):
            raise InvalidModel(f"{url!r} holds no model artifact ({artifact.MANIFEST_FILE} and {artifact.WEIGHTS_FILE})")
        self._loading.add(name)
        try:
            async with self._lock:
                await self._make_room(name, estimate_bytes(model_dir))
                started = time.perf_counter()
                try:
                    predictor = await asyncio.to_thread(self._load_warm, model_dir)
                except (artifact.ArtifactError, ValueError, KeyError, OSError) as exc:
                    raise InvalidModel(f"model {name!r} could not be loaded from {url!r}: {exc}") from None
                except (MemoryError, torch.OutOfMemoryError):
                    raise InsufficientMemory(f"ran out of memory loading model {name!r}") from None
                batcher = self._make_batcher(predictor)
                batcher.start()
                loaded = LoadedModel(name, url, predictor, batcher, memory.model_bytes(predictor.model))
                self._models[name] = loaded
        finally:
            self._loading.discard(name)
        logger.info("loaded model %r from %s in %.2f s (%.1f MB)", name, url, time.perf_counter() - started,
                    loaded.footprint_bytes / MEGABYTE)
        return loaded

    async def unload(self, name: str) -> None:
        async with self._lock:
            if name not in self._models:
                raise ModelNotFound(f"model {name!r} is not loaded")
            await self._unload(name)

    async def close(self) -> None:
        for model in list(self._models.values()):
            await model.batcher.stop()
        self._models.clear()

    def _load_warm(self, model_dir: Path) -> Predictor:
        predictor = self._load(model_dir)
        predictor.warm_up()
        return predictor

    async def _unload(self, name: str) -> None:
        model = self._models.pop(name)  # new requests for it get 404 from here on
        await model.batcher.drain()  # requests already queued still get their answers
        if self._device.type == "cuda":
            torch.cuda.empty_cache()
        logger.info("unloaded model %r (%.1f MB)", name, model.footprint_bytes / MEGABYTE)

    def _shortfall(self, need: int) -> str | None:
        """Why ``need`` more bytes do not fit now, or None when they do."""
        if self._budget is not None:
            used = sum(model.footprint_bytes for model in self._models.values())
            if used + need > self._budget:
                return (f"the loaded models use {used / MEGABYTE:.0f} MB of the {self._budget / MEGABYTE:.0f} MB "
                        f"budget and this one needs about {need / MEGABYTE:.0f} MB")
        free = self._available(self._device)
        if free is not None and free - self._reserve < need:
            return (f"{free / MEGABYTE:.0f} MB is free ({self._reserve / MEGABYTE:.0f} MB kept in reserve) and this "
                    f"model needs about {need / MEGABYTE:.0f} MB")
        return None

    async def _make_room(self, name: str, need: int) -> None:
        while (reason := self._shortfall(need)) is not None:
            if not self._evict or not self._models:
                raise InsufficientMemory(f"cannot load model {name!r}: {reason}")
            oldest = next(iter(self._models))
            logger.info("unloading least recently used model %r to make room for %r", oldest, name)
            await self._unload(oldest)
