"""The network exported as an ONNX graph, and the check that the graph computes what it does.

Training writes the graph into the artifact (``graph.onnx``, beside the weights); the server runs
it with ONNX Runtime on a CPU, and exports it itself for an artifact that lacks it. Either side
runs the graph only once it has passed :func:`compare` against the PyTorch network on sample
inputs: every logit within :data:`RELATIVE_TOLERANCE` of the largest logit's size (at least 1),
and the same top-1 class for every input, except where PyTorch's own two best classes are closer
than that tolerance.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import threading
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from classifier import artifact
from classifier.onnx_model import OnnxModel

logger = logging.getLogger(__name__)
GRAPH_FILE = "graph.onnx"
RELATIVE_TOLERANCE = 1e-3
EXPORT_BATCH, CHECK_BATCHES = 2, (1, 3)  # the check runs other batch sizes than the export traced
EXPORTER_LOGGERS = ("torch", "onnx_ir", "onnxscript")  # they log every rewrite they make
TERMINAL_CODES = re.compile(r"\x1b\[[0-9;]*m")  # the exporter colours its messages
EXPORTING = threading.Lock()


class ExportError(RuntimeError):
    """The network could not be exported as an ONNX graph."""


def sample(batch: int, crop_size: int, seed: int) -> torch.Tensor:
    """Reproducible inputs of the network's shape (the global random state is left alone)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, crop_size, crop_size, generator=generator)


def export(model: nn.Module, crop_size: int) -> bytes:
    """``model`` (on the CPU, float32) as an ONNX graph with any batch size: input ``images``
    (N×3×crop×crop), output ``logits``. Raises :class:`ExportError` with the exporter's reason."""
    buffer = io.BytesIO()
    _thread_lock_for_progress_bars()
    try:
        # One export at a time: the exporter's warnings, log records and prints are silenced for
        # its duration, and those settings are the process's. A failed torch.export prints the
        # whole traced graph to stderr; the log gets the reason in one line instead. (The log's
        # handlers keep the streams they were given, so only bare prints from other threads are
        # lost meanwhile.)
        with (EXPORTING, warnings.catch_warnings(), _quiet(EXPORTER_LOGGERS),
              contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()), torch.no_grad()):
            warnings.simplefilter("ignore")
            torch.onnx.export(model.eval(), (sample(EXPORT_BATCH, crop_size, seed=0),), buffer, dynamo=True,
                              input_names=["images"], output_names=["logits"], verbose=False,
                              dynamic_shapes=({0: torch.export.Dim("batch")},))
    except Exception as exc:  # noqa: BLE001 - the exporter fails in many ways; each means: no graph
        raise ExportError(reason(exc)) from None
    return buffer.getvalue()


def reason(exc: BaseException) -> str:
    """An exception's first line, and its root cause's (the exporter wraps the cause that says
    what in the network it could not follow in a generic "failed to export")."""
    def first_line(error: BaseException) -> str:
        text = TERMINAL_CODES.sub("", str(error)).strip()
        return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"

    root = exc
    while root.__cause__ is not None and root.__cause__ is not root:
        root = root.__cause__
    return first_line(exc) if root is exc else f"{first_line(exc)} ... {first_line(root)}"


def _thread_lock_for_progress_bars() -> None:
    """The exporter runs torch.fx, which opens (disabled) tqdm progress bars; tqdm's default lock
    is a multiprocessing semaphore, which a server's worker process leaves behind at exit (and
    Python's resource tracker then prints a warning into the server's log). A thread lock does."""
    try:
        from tqdm import tqdm
    except ImportError:
        return
    if getattr(tqdm, "_lock", None) is None:
        tqdm.set_lock(threading.RLock())


@contextlib.contextmanager
def _quiet(names: tuple[str, ...]) -> Iterator[None]:
    """The named loggers' records below ERROR dropped for the duration: a failed export is reported
    once, by the caller, in a sentence."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [each.level for each in loggers]
    for each in loggers:
        each.setLevel(max(logging.ERROR, each.getEffectiveLevel()))
    try:
        yield
    finally:
        for each, level in zip(loggers, levels):
            each.setLevel(level)


@dataclass(frozen=True)
class Comparison:
    """How the graph's logits compare with PyTorch's on the sample inputs."""

    max_difference: float
    tolerance: float
    top1_agrees: bool
    shape_agrees: bool = True

    @property
    def ok(self) -> bool:
        return self.shape_agrees and self.max_difference <= self.tolerance and self.top1_agrees

    def describe(self) -> str:
        if not self.shape_agrees:
            return "the graph answers a different number of scores"
        agreement = "same top-1" if self.top1_agrees else "a different top-1"
        return f"largest logit difference {self.max_difference:.2g} (tolerance {self.tolerance:.2g}), {agreement}"


def compare(model: nn.Module, graph: OnnxModel, crop_size: int) -> Comparison:
    """Run ``model`` (on the CPU) and ``graph`` on the same sample inputs, one image and a batch of
    three, and compare the logits."""
    inputs = [sample(size, crop_size, seed=1) for size in CHECK_BATCHES]
    with torch.inference_mode():
        expected = np.concatenate([model.eval()(batch).float().numpy() for batch in inputs]).astype(np.float64)
    got = np.concatenate([graph(batch, threads=graph.thread_counts[0]) for batch in inputs]).astype(np.float64)
    tolerance = RELATIVE_TOLERANCE * max(1.0, float(np.abs(expected).max()))
    if got.shape != expected.shape:
        return Comparison(float("inf"), tolerance, False, shape_agrees=False)
    difference = float(np.abs(got - expected).max())
    ranked = np.sort(expected, axis=1)
    decisive = ranked[:, -1] - ranked[:, -2] > tolerance if expected.shape[1] > 1 else np.ones(len(expected), bool)
    agrees = bool(np.all((got.argmax(1) == expected.argmax(1)) | ~decisive))
    return Comparison(difference, tolerance, agrees)


def opened_and_checked(model: nn.Module, graph: str | os.PathLike[str] | bytes, crop_size: int, *,
                       threads: int | Iterable[int] | None = 1) -> tuple[OnnxModel, Comparison]:
    """``graph`` (a file or its bytes) opened in ONNX Runtime and compared with ``model``. Raises
    :class:`ExportError` ("cannot be run: ...", "differs from the network: ...") otherwise."""
    try:
        network = OnnxModel(graph, threads)
        comparison = compare(model, network, crop_size)
    except Exception as exc:  # noqa: BLE001 - ONNX Runtime raises its own types; each means: no graph
        raise ExportError(f"cannot be run: {reason(exc)}") from None
    if not comparison.ok:
        raise ExportError(f"differs from the network: {comparison.describe()}")
    return network, comparison


def checked_graph(model: nn.Module, crop_size: int, *,
                  threads: int | Iterable[int] | None = 1) -> tuple[bytes, OnnxModel, Comparison]:
    """Export ``model`` and open and compare the graph. Raises :class:`ExportError` when the export
    fails, the graph cannot be run, or it differs from the network."""
    graph = export(model, crop_size)
    try:
        network, comparison = opened_and_checked(model, graph, crop_size, threads=threads)
    except ExportError as exc:
        raise ExportError(f"the exported graph {exc}") from None
    return graph, network, comparison


def write_graph(directory: str | os.PathLike[str]) -> Path | None:
    """Export the network of the artifact in ``directory`` (as saved: on the CPU, float32), check
    it, and write it there as :data:`GRAPH_FILE`; None, with a warning, when that fails (the
    server then exports the network itself, or runs it with PyTorch). Never raises: the artifact
    is complete without it. A graph left from earlier weights is removed first."""
    path = Path(directory) / GRAPH_FILE
    try:
        path.unlink(missing_ok=True)
        network, manifest = artifact.load(directory)
        graph, _, comparison = checked_graph(network, manifest.preprocessing.crop_size)
        artifact.write_atomically(path, lambda target: target.write_bytes(graph))
    except Exception as exc:  # noqa: BLE001 - whatever fails, the artifact stands without the graph
        path.with_name(f".{GRAPH_FILE}.tmp").unlink(missing_ok=True)  # write_atomically's, if it got that far
        logger.warning("no %s in the artifact: %s", GRAPH_FILE, exc if isinstance(exc, ExportError) else reason(exc))
        return None
    logger.info("%s written: the network as ONNX; %s", GRAPH_FILE, comparison.describe())
    return path
