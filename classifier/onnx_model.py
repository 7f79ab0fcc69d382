"""An ONNX image classifier run by ONNX Runtime on the CPU, called like the torch networks.

The network takes one input, a batch of images (N×3×H×W, float32 or float16), and its first
output is one score per class (N×classes). A network exported with a fixed batch size is run that
many images at a time (the last batch filled up with blank images) and the answers put together;
a fixed image size is what preprocessing must produce (:attr:`OnnxModel.image_size` says which).

One session is opened per thread count the caller asks for (``threads``): a pass runs on the
session for the thread count it is given (the server's scheduling policy decides it), or without
one, the calling thread's torch setting (``torch.set_num_threads``). A single-threaded
session runs on the calling thread itself, so several passes on it run side by side; a wider one
spreads a pass over its own pool of threads. Each session holds its own copy of the weights.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

ONNX_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


class OnnxModelError(ValueError):
    """The file is not an ONNX image classifier this server can run."""


class OnnxModel:
    def __init__(self, path: str | os.PathLike[str] | bytes, threads: int | Iterable[int] | None = None, *,
                 size_bytes: int | None = None) -> None:
        """``path``: the ONNX file (or its bytes). ``threads``: the thread counts to open sessions
        for (None: one per core)."""
        import onnxruntime  # only where ONNX runs: it costs memory at import

        counts = [threads] if isinstance(threads, int) or threads is None else list(threads)
        self.thread_counts = tuple(sorted({count or os.cpu_count() or 1 for count in counts}))
        self._sessions = {count: self._open(onnxruntime, path, count) for count in self.thread_counts}
        session = self._sessions[self.thread_counts[0]]
        inputs, outputs = session.get_inputs(), session.get_outputs()
        if len(inputs) != 1 or len(inputs[0].shape) != 4:
            described = ", ".join(f"{i.name} {i.shape}" for i in inputs)
            raise OnnxModelError(f"an image classifier takes one input, a batch of images N×3×H×W; this one takes "
                                 f"{described}")
        if inputs[0].type not in ONNX_TYPES:
            raise OnnxModelError(f"the input is {inputs[0].type}; an image classifier here takes float or float16")
        self.input_name = inputs[0].name
        self.output_name = outputs[0].name
        self.dtype = ONNX_TYPES[inputs[0].type]
        batch, channels, height, width = (size if isinstance(size, int) else None for size in inputs[0].shape)
        if channels not in (3, None):
            raise OnnxModelError(f"the input has {channels} channels; images here have 3 (RGB)")
        scores = outputs[0].shape[-1] if outputs[0].shape else None
        self.num_classes = scores if isinstance(scores, int) else None  # scores per image; None: not fixed
        self.batch_size = batch  # None: any
        self.image_size = height if height is not None and height == width else None  # None: any (or not square)
        self.fixed_shape = (height, width)
        # What the weights take in memory, near enough: its files' size (the caller knows which they
        # are), once per session.
        if size_bytes is None:
            size_bytes = len(path) if isinstance(path, bytes) else Path(path).stat().st_size
        self.weight_bytes = size_bytes * len(self._sessions)

    @staticmethod
    def _open(onnxruntime, path: str | os.PathLike[str] | bytes, threads: int):
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        # Passes run side by side on the server's inference threads: pool threads that spin while
        # waiting for work would take the cores the other passes need.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        source = path if isinstance(path, bytes) else str(path)
        try:
            return onnxruntime.InferenceSession(source, options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types for every kind of bad file
            name = "the graph" if isinstance(path, bytes) else Path(path).name
            raise OnnxModelError(f"{name} is not an ONNX model ONNX Runtime can run: "
                                 f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None

    def session_for(self, threads: int):
        """The widest session with at most ``threads`` threads (the narrowest if none is that narrow)."""
        fitting = [count for count in self.thread_counts if count <= threads]
        return self._sessions[fitting[-1] if fitting else self.thread_counts[0]]

    def __call__(self, batch: torch.Tensor | np.ndarray, threads: int | None = None) -> np.ndarray:
        """Scores (float32) for a batch of preprocessed images, on the session for ``threads``
        (None: the calling thread's torch setting)."""
        session = self.session_for(torch.get_num_threads() if threads is None else threads)
        source = batch.detach().cpu().numpy() if isinstance(batch, torch.Tensor) else batch
        array = np.ascontiguousarray(source, dtype=self.dtype)
        height, width = self.fixed_shape
        if (height is not None and array.shape[2] != height) or (width is not None and array.shape[3] != width):
            raise OnnxModelError(f"the network takes {height}×{width} images; preprocessing made "
                                 f"{array.shape[2]}×{array.shape[3]}")
        count = len(array)
        step = self.batch_size or count
        if count % step:  # a fixed batch size: the last batch filled up with blank images
            array = np.concatenate([array, np.zeros((step - count % step, *array.shape[1:]), self.dtype)])
        parts = [session.run([self.output_name], {self.input_name: array[start:start + step]})[0]
                 for start in range(0, len(array), step)]
        scores = parts[0] if len(parts) == 1 else np.concatenate(parts)
        return scores[:count].astype(np.float32, copy=False)
