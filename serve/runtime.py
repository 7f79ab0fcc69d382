"""Which engine runs a model's forward passes on a CPU: ONNX Runtime, or PyTorch.

``CLASSIFIER_RUNTIME=auto`` (the default) runs a network with ONNX Runtime on a CPU and with
PyTorch on a GPU; ``onnxruntime`` and ``torch`` choose one engine (bench/results/runtimes.md has
the measurements behind the choice). ONNX Runtime runs the network's exported graph, taken from
the first place that has one that passes :func:`classifier.export.compare`:

1. ``graph.onnx`` in the artifact (training writes it);
2. the graph cache (``CLASSIFIER_GRAPH_CACHE``), under a key made of the weights' SHA-256, the
   crop size, the versions of everything that builds or exports the network (PyTorch,
   torchvision, timm, ONNX Runtime, onnxscript) and a digest of this project's own network code,
   so a cached graph is never used for other weights or after any of those changed;
3. a fresh export, written to the cache for the next start (skipped when the cache cannot be
   written, e.g. on a read-only file system).

A graph enters the cache only once it has passed the check. So before all of these, a cached
graph that only its owner (this user or root) may change, in a folder where no one else can
replace it, is opened as it is, without building the PyTorch network
(:func:`trusted_cached_graph`): the built-in model starts from the image's baked graph this way.
Any other graph is checked each time it is opened.

A network that cannot be exported, or whose graph differs, runs with PyTorch, with a warning that
says why. An artifact that is itself ONNX runs with ONNX Runtime whatever the setting.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import logging
import os
import stat
import tempfile
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

import classifier
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


# What builds and exports a network besides the weights: a change in any makes other graphs.
GRAPH_MAKERS = ("torch", "torchvision", "timm", "onnxruntime", "onnxscript")


@functools.cache
def graph_makers() -> str:
    """The versions of the libraries that build and export networks, and a digest of this
    project's code that does (``classifier/*.py``)."""
    versions = []
    for name in GRAPH_MAKERS:
        try:
            versions.append(f"{name}={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            versions.append(f"{name}=none")
    code = hashlib.sha256()
    for path in sorted(Path(classifier.__file__).parent.glob("*.py")):
        code.update(path.name.encode() + b"\0" + path.read_bytes())
    return ",".join([*versions, f"classifier={code.hexdigest()[:16]}"])


@functools.lru_cache(maxsize=16)
def _weights_digest(path: Path, identity: tuple[int, ...]) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def cache_key(weights: Path, manifest: Manifest) -> str:
    """The cache's name for the graph of these weights, exported at this crop size by these
    libraries and this code (the weights are hashed once per file version)."""
    info = weights.stat()  # a new file, or a changed one, has another identity (ctime changes with any write)
    identity = (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)
    digest = hashlib.sha256(_weights_digest(weights, identity).encode())
    digest.update(f"{manifest.architecture}/{manifest.preprocessing.crop_size}/{graph_makers()}".encode())
    return digest.hexdigest()[:32]


def _distrust(info: os.stat_result, *, folder: bool) -> str | None:
    """Why a cache folder, or a graph in it, may hold what someone else put there (None: it cannot).
    A folder must be its owner's alone or sticky (as /tmp and the image's /opt/graphs are), so no
    one replaces another's file; a graph must be one plain file that only its owner may change."""
    if info.st_uid not in (0, os.getuid()):
        return f"it belongs to user {info.st_uid}"
    if folder:
        return None if not info.st_mode & 0o022 or info.st_mode & stat.S_ISVTX else "others may write into it"
    if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
        return "it is not one plain file"
    return "others may write it" if info.st_mode & 0o022 else None


def trusted_cached_graph(weights: Path, manifest: Manifest, cache: Path | None,
                         threads: int | Iterable[int] | None) -> OnnxModel | None:
    """The cached graph of these weights, opened without the PyTorch network, if neither the cache
    folder nor the graph may hold what someone else put there (:func:`_distrust`; the graph is not
    a link, and is read from the descriptor its owner and mode were read from) and it takes the
    manifest's crop size and answers its class count; else None (and the caller checks whatever
    graph it finds against the network)."""
    if cache is None:
        return None
    name = f"{cache_key(weights, manifest)}.onnx"
    try:
        folder = os.open(cache, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return None
    try:
        why = _distrust(os.fstat(folder), folder=True)
        if why is not None:
            logger.info("checking cached graphs against the network: the graph cache %s may hold others' files (%s)",
                        cache, why)
            return None
        try:
            # Not through a link; never waiting on a pipe someone put there.
            descriptor = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=folder)
        except OSError:
            return None  # none cached (or a link, which is not followed)
    finally:
        os.close(folder)
    with os.fdopen(descriptor, "rb") as file:
        why = _distrust(os.fstat(file.fileno()), folder=False)
        if why is not None:
            logger.info("checking the graph cache's %s against the network: %s", name, why)
            return None
        graph = file.read()
    try:
        network = OnnxModel(graph, threads)
    except Exception as exc:  # noqa: BLE001 - the caller falls back to the checked path
        logger.warning("not using the graph cache's %s: %s", name, reason(exc))
        return None
    crop, classes = manifest.preprocessing.crop_size, network.num_classes
    if network.fixed_shape not in ((None, None), (crop, crop)) or classes != manifest.num_classes:
        logger.warning("checking the graph cache's %s against the network: it takes %s images and answers %s "
                       "classes, the manifest %d×%d and %d", name, network.fixed_shape, classes, crop, crop,
                       manifest.num_classes)
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
    """Write ``graph`` to the cache if the cache can be written and no one else may write into it
    (see :func:`_distrust`); a failure only costs the next start an export. Readable by every user
    (the cache may be shared)."""
    temporary: Path | None = None
    try:
        path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        why = _distrust(path.parent.stat(), folder=True)
        if why is not None:
            logger.info("the exported graph is not cached: the graph cache %s may hold others' files (%s)",
                        path.parent, why)
            return
        handle, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
        temporary = Path(name)
        with os.fdopen(handle, "wb") as file:
            file.write(graph)
            os.fchmod(file.fileno(), 0o644)  # the file written, never what its name may point to by now
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
