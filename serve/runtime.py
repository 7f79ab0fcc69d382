"""Which engine runs a model's forward passes on a CPU: ONNX Runtime, or PyTorch.

``CLASSIFIER_RUNTIME=auto`` (the default) runs a network with ONNX Runtime on a CPU and with
PyTorch on a GPU; ``onnxruntime`` and ``torch`` choose one engine (bench/results/runtimes.md has
the measurements behind the choice). ONNX Runtime runs the network's exported graph, taken from
the first place that has one that passes :func:`classifier.export.compare`:

1. ``graph.onnx`` in the artifact (training writes it);
2. the graph cache (``CLASSIFIER_GRAPH_CACHE``), under a key made of the weights' SHA-256, the
   crop size and the PyTorch version, so a cached graph is never used for other weights;
3. a fresh export, written to the cache for the next start (skipped when the cache cannot be
   written, e.g. on a read-only file system).

A graph enters the cache only once it has passed the check, so a cached graph that no one but its
writer (this user or root) can have changed is opened without building the PyTorch network at
all (:func:`trusted_cached_graph`): the built-in model starts from the image's baked graph in a
fraction of a second. Any other graph is checked each time it is opened.

A network that cannot be exported, or whose graph differs, runs with PyTorch, with a warning that
says why. An artifact that is itself ONNX runs with ONNX Runtime whatever the setting.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from classifier.artifact import Manifest
from classifier.export import GRAPH_FILE, ExportError, checked_graph, opened_and_checked, reason
from classifier.onnx_model import OnnxModel
from serve.settings import RUNTIMES

logger = logging.getLogger(__name__)
AUTO, ONNXRUNTIME, TORCH = RUNTIMES


def uses_onnxruntime(runtime: str, device: torch.device) -> bool:
    """Whether a PyTorch network is to run with ONNX Runtime (on the CPU) under this setting."""
    if runtime == ONNXRUNTIME and device.type != "cpu":
        logger.warning("CLASSIFIER_RUNTIME=onnxruntime runs on the CPU, not %s: the image's ONNX Runtime is "
                       "its CPU build", device)
    return runtime == ONNXRUNTIME or (runtime == AUTO and device.type == "cpu")


def cache_key(weights: Path, manifest: Manifest) -> str:
    """The cache's name for the graph of these weights, exported by this PyTorch at this crop size."""
    digest = hashlib.sha256()
    with weights.open("rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    digest.update(f"{manifest.architecture}/{manifest.preprocessing.crop_size}/{torch.__version__}".encode())
    return digest.hexdigest()[:32]


def trusted_cached_graph(weights: Path, manifest: Manifest, cache: Path | None,
                         threads: int | Iterable[int] | None) -> OnnxModel | None:
    """The cached graph of these weights, opened without the PyTorch network, if the cache holds
    one written by this user or root that no one else may write; else None (and the caller checks
    whatever graph it finds against the network)."""
    if cache is None:
        return None
    path = cache / f"{cache_key(weights, manifest)}.onnx"
    try:
        info = path.stat()
    except OSError:
        return None
    if info.st_uid not in (0, os.getuid()) or info.st_mode & 0o022:
        logger.warning("checking %s against the network: others than its owner may have written it", path)
        return None
    try:
        network = OnnxModel(path, threads)
    except Exception as exc:  # noqa: BLE001 - the caller falls back to the checked path
        logger.warning("not using the graph cache's %s: %s", path.name, reason(exc))
        return None
    if network.image_size not in (None, manifest.preprocessing.crop_size):
        return None
    logger.info("running the network with ONNX Runtime: graph from the graph cache (checked when it was stored)")
    return network


def onnx_engine(model: nn.Module, manifest: Manifest, *, artifact_dir: Path | None, weights: Path | None,
                cache: Path | None, threads: int | Iterable[int] | None) -> OnnxModel | None:
    """``model``'s graph opened in ONNX Runtime once it is checked against ``model`` (float32, on the
    CPU); None, with a warning, when no graph passes. ``weights``: the file the network's weights
    came from (the cache key; None: no cache)."""
    crop = manifest.preprocessing.crop_size
    if artifact_dir is not None:
        network = _checked(model, artifact_dir / GRAPH_FILE, f"the artifact's {GRAPH_FILE}", crop, threads)
        if network is not None:
            return network
    cached = cache / f"{cache_key(weights, manifest)}.onnx" if cache is not None and weights is not None else None
    if cached is not None:
        network = _checked(model, cached, "the graph cache", crop, threads)
        if network is not None:
            return network
    try:
        graph, network, comparison = checked_graph(model, crop, threads=threads)
    except Exception as exc:  # noqa: BLE001 - whatever fails (onnxruntime missing too), PyTorch runs it
        logger.warning("running the network with PyTorch: it could not be run with ONNX Runtime (%s)",
                       exc if isinstance(exc, ExportError) else reason(exc))
        return None
    if cached is not None:
        _store(cached, graph)
    logger.info("running the network with ONNX Runtime: graph exported now; %s", comparison.describe())
    return network


def _checked(model: nn.Module, path: Path, origin: str, crop: int,
             threads: int | Iterable[int] | None) -> OnnxModel | None:
    """The graph at ``path`` opened, if there is one and it computes what ``model`` does; else None
    (with a warning when there was a graph)."""
    if not path.is_file():
        return None
    try:
        network, comparison = opened_and_checked(model, path, crop, threads=threads)
    except ExportError as exc:
        logger.warning("not using %s: it %s", origin, exc)
        return None
    logger.info("running the network with ONNX Runtime: graph from %s; %s", origin, comparison.describe())
    return network


def _store(path: Path, graph: bytes) -> None:
    """Write ``graph`` to the cache if the cache can be written; a failure only costs the next start
    an export. Readable by every user (the cache may be shared)."""
    temporary: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
        temporary = Path(name)
        with os.fdopen(handle, "wb") as file:
            file.write(graph)
        temporary.chmod(0o644)
        os.replace(temporary, path)
    except OSError as exc:
        if temporary is not None:
            temporary.unlink(missing_ok=True)
        logger.info("the exported graph is not cached (%s); the next start exports it again", exc)


def main() -> int:
    """``python -m serve.runtime``: put the built-in model's graph in the graph cache (the image's
    build does this, so the default model starts without exporting)."""
    from classifier.pretrained import default_model, default_weights_file
    from serve.settings import Settings

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cache = Settings.from_env(os.environ).graph_cache
    model, manifest = default_model()
    return 0 if onnx_engine(model, manifest, artifact_dir=None, weights=default_weights_file(), cache=cache,
                            threads=1) is not None else 1


if __name__ == "__main__":
    raise SystemExit(main())
