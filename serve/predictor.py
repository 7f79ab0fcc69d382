"""Images in, logits out. Knows nothing of HTTP.

``preprocess`` turns one image into the network's input (run in parallel, off the event loop);
``infer`` runs one forward pass over a stacked batch (run on one inference thread).

Which engine runs the passes is :mod:`serve.runtime`'s choice: on a CPU, by default, ONNX Runtime
runs the network's exported graph, checked against the network first. With PyTorch
(``CLASSIFIER_RUNTIME=torch``, a GPU, or a network that cannot be exported) the network is traced
and frozen with TorchScript on a CPU (``CLASSIFIER_JIT``): freezing folds batch norm into the
convolutions and drops the Python dispatch between layers. The traced network is checked against
the original on a batch of another size and thrown away, with a warning, if it differs or tracing
fails: the server then runs the network as it is. Inputs are channels-last on both devices
(faster for convolutions on CPU and GPU alike), in half precision on a GPU.

An ONNX artifact's network runs in ONNX Runtime on the CPU (see :mod:`classifier.onnx_model`),
also in the CUDA image: its predictor's device is the CPU.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from classifier import artifact
from classifier.artifact import ArtifactError, Manifest
from classifier.onnx_model import OnnxModel
from classifier.pretrained import default_manifest, default_model, default_weights_file
from serve import codec, runtime
from serve.memory import model_bytes
from serve.scheduling import PassTimes

logger = logging.getLogger(__name__)
TORCHSCRIPT = "torchscript"  # Predictor.runtime of a network traced and frozen (PyTorch's CPU path)


def select_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def freeze(model: nn.Module, input_shape: tuple[int, ...], device: torch.device,
           dtype: torch.dtype) -> torch.jit.ScriptModule | None:
    """``model`` traced and frozen, or None if tracing fails or the result differs from ``model``."""
    generator = torch.Generator().manual_seed(0)  # leaves the global random state alone

    def example(size: int) -> torch.Tensor:
        inputs = torch.randn(size, *input_shape, generator=generator)
        return inputs.to(device, dtype).contiguous(memory_format=torch.channels_last)

    try:
        with warnings.catch_warnings(), torch.inference_mode():
            # TorchScript is deprecated, not gone: a FutureWarning here, a DeprecationWarning in older torch.
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            scripted = model if isinstance(model, torch.jit.ScriptModule) else torch.jit.trace(
                model, example(2), check_trace=False)
            frozen = torch.jit.freeze(scripted.eval())
            check = example(3)  # another batch size: the trace must not have fixed it
            expected, got = model(check).float(), frozen(check).float()
    except Exception as exc:  # noqa: BLE001 - any failure means: run the network as it is
        logger.warning("running the network without TorchScript: tracing failed (%s: %s)", type(exc).__name__, exc)
        return None
    tolerance = 1e-3 * max(1.0, expected.abs().max().item())
    if got.shape != expected.shape or not torch.allclose(got, expected, rtol=0, atol=tolerance):
        logger.warning("running the network without TorchScript: the traced network's outputs differ")
        return None
    return frozen


class Predictor:
    def __init__(self, model: nn.Module | OnnxModel, manifest: Manifest, device: torch.device, *,
                 half: bool | None = None, jit: bool | None = None) -> None:
        self.manifest = manifest
        self.preprocessing = manifest.preprocessing.eval_preset()
        crop = manifest.preprocessing.crop_size
        self.input_shape = (3, crop, crop)
        self.resize_size = manifest.preprocessing.resize_size  # the short side preprocessing resizes to
        self.pass_times: PassTimes | None = None  # as the server timed this model's passes at warm-up
        if isinstance(model, OnnxModel):
            if device.type != "cpu":
                logger.warning("the ONNX network runs on the CPU (ONNX Runtime); package a state dict or "
                               "TorchScript file to run on %s", device)
            self.device, self.half = torch.device("cpu"), False
            self.runtime = runtime.ONNXRUNTIME  # what runs the passes: onnxruntime, torchscript or torch
            self.weight_bytes = model.weight_bytes
            self.model: nn.Module | torch.jit.ScriptModule | OnnxModel = model
            return
        self.device = device
        self.half = device.type == "cuda" if half is None else half and device.type == "cuda"
        model = model.to(device).eval()
        if self.half:
            model = model.half()
        model = model.to(memory_format=torch.channels_last)
        self.weight_bytes = model_bytes(model)  # what the model holds in memory, frozen or not
        frozen = None
        if device.type == "cpu" if jit is None else jit:
            frozen = freeze(model, self.input_shape, device, torch.float16 if self.half else torch.float32)
        self.runtime = TORCHSCRIPT if frozen is not None else runtime.TORCH
        # The network that runs: frozen when it could be (the original is then let go).
        self.model = frozen if frozen is not None else model

    @classmethod
    def load(cls, model_dir: Path, *, allow_default: bool, device: str = "auto", half: bool | None = None,
             jit: bool | None = None, threads: int | Sequence[int] | None = None, engine: str = runtime.AUTO,
             graph_cache: Path | None = None) -> Predictor:
        """The artifact in ``model_dir``; for an empty (or missing) folder, if allowed, the built-in
        ImageNet model. A folder holding anything else is refused with what it holds. ``threads``:
        for a network run by ONNX Runtime, the thread counts its passes may ask for (None: one per
        core). ``engine``: a ``CLASSIFIER_RUNTIME`` value (see :mod:`serve.runtime`); ``graph_cache``:
        where exported graphs are kept (None: nowhere)."""
        target = select_device(device)
        onnx = runtime.uses_onnxruntime(engine, target)
        trusted = cls._trusted_graph(model_dir, allow_default=allow_default, cache=graph_cache,
                                     threads=threads) if onnx else None
        if trusted is not None:
            return cls(*trusted, torch.device("cpu"))
        if artifact.is_artifact(model_dir):
            model, manifest = artifact.load(model_dir, device=target, threads=threads)
            logger.info("loaded %s with %d classes from %s", manifest.architecture, manifest.num_classes, model_dir)
            artifact_dir: Path | None = model_dir
            weights = artifact.weights_file(model_dir, manifest)
        elif artifact.visible_entries(model_dir):
            # Never answer with ImageNet labels for a model that was meant to be served.
            raise ArtifactError(artifact.not_an_artifact(model_dir))
        elif allow_default:
            model, manifest = default_model()
            logger.info("the model folder %s is empty; serving the built-in ImageNet %s", model_dir,
                        manifest.architecture)
            artifact_dir, weights = None, default_weights_file()
        else:
            raise ArtifactError(f"no model artifact in {model_dir} and the default model is disabled")
        # A TorchScript network cannot be exported by torch.export: it runs as it is.
        if isinstance(model, nn.Module) and not isinstance(model, torch.jit.ScriptModule) and onnx:
            graph = runtime.onnx_engine(model.cpu().float(), manifest, artifact_dir=artifact_dir, weights=weights,
                                        cache=graph_cache, threads=threads)
            if graph is not None:
                return cls(graph, manifest, torch.device("cpu"))
            model = model.to(target)
        return cls(model, manifest, target, half=half, jit=jit)

    @staticmethod
    def _trusted_graph(model_dir: Path, *, allow_default: bool, cache: Path | None,
                       threads: int | Sequence[int] | None) -> tuple[OnnxModel, Manifest] | None:
        """The graph cache's graph of the network ``model_dir`` holds (or of the built-in model),
        when it can be run without building the network (see :func:`runtime.trusted_cached_graph`)."""
        if cache is None:
            return None
        if artifact.is_artifact(model_dir):
            manifest = artifact.load_manifest(model_dir)
            if manifest.architecture in (artifact.TORCHSCRIPT, artifact.ONNX):
                return None
            weights, source = artifact.weights_file(model_dir, manifest), str(model_dir)
        elif allow_default and not artifact.visible_entries(model_dir):
            manifest, weights = default_manifest(), default_weights_file()
            source = f"the built-in ImageNet model ({model_dir} is empty)"
        else:
            return None
        graph = runtime.trusted_cached_graph(weights, manifest, cache, threads) if weights.is_file() else None
        if graph is None:
            return None
        logger.info("serving %s with %d classes from %s", manifest.architecture, manifest.num_classes, source)
        return graph, manifest

    @property
    def onnx(self) -> bool:
        """Whether ONNX Runtime runs the passes (on the CPU)."""
        return self.runtime == runtime.ONNXRUNTIME

    @property
    def jit(self) -> bool:
        """Whether the network runs traced and frozen with TorchScript."""
        return self.runtime == TORCHSCRIPT

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.manifest.class_names

    @property
    def thresholds(self) -> tuple[float, ...] | None:
        """A multi-label model's per-class thresholds (None: one class an image, by softmax)."""
        return self.manifest.thresholds if self.manifest.task == artifact.MULTILABEL else None

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        return self.preprocessing(image)

    @torch.inference_mode()
    def infer(self, batch: torch.Tensor, threads: int | None = None) -> np.ndarray:
        """Logits (float32, on the CPU) for a batch of preprocessed inputs, computed with ``threads``
        threads: ONNX Runtime's session for that many, or PyTorch's setting on this thread (on a
        GPU, for the host-side copies; None: the calling thread's torch setting)."""
        if isinstance(self.model, OnnxModel):
            return self.model(batch, threads)
        if threads is not None:
            torch.set_num_threads(threads)
        if self.device.type == "cuda":
            batch = batch.pin_memory().to(self.device, non_blocking=True)
        if self.half:
            batch = batch.half()
        batch = batch.contiguous(memory_format=torch.channels_last)
        # The profiling executor would re-optimise a frozen graph for each new batch size (a
        # first pass twice as slow); freezing already did the optimising that counts here.
        with torch.jit.optimized_execution(False):
            return self.model(batch).float().cpu().numpy()

    def predict(self, images: Sequence[Image.Image], top_k: int) -> list[list[codec.Prediction]]:
        """Ranked predictions for ``images`` in one pass (for in-process use and tests)."""
        logits = self.infer(torch.stack([self.preprocess(image) for image in images]))
        if self.thresholds is not None:
            return codec.over_thresholds(logits, self.class_names, self.thresholds)
        return codec.top_k(logits, self.class_names, top_k)

    def warm_up(self, threads: int | None = None) -> None:
        """One inference on a blank image with ``threads`` threads (and with ONNX Runtime, one on
        every session), so the first request does not pay for lazy setup; the network must answer
        one score per class name."""
        batch = self._blank_image()
        if isinstance(self.model, OnnxModel):
            for count in self.model.thread_counts:
                self.model(batch, count)
        logits = self.infer(batch, threads)
        if logits.shape != (1, self.manifest.num_classes):
            raise ArtifactError(f"the network answers {logits.shape[1:]} scores per image but the manifest names "
                                f"{self.manifest.num_classes} classes")

    def time_pass(self, threads: int | None, batch: int = 1, runs: int = 2) -> float:
        """Seconds each image takes in a pass of ``batch`` blank images with ``threads`` threads, the
        fastest of ``runs`` passes (after :meth:`warm_up`, which pays for the lazy setup)."""
        one = self._blank_image()
        inputs = one.expand(batch, *one.shape[1:]).contiguous()
        seconds = []
        for _ in range(runs):
            started = time.perf_counter()
            self.infer(inputs, threads)
            seconds.append(time.perf_counter() - started)
        return min(seconds) / batch

    def _blank_image(self) -> torch.Tensor:
        size = self.manifest.preprocessing.resize_size
        return self.preprocess(Image.new("RGB", (size, size)))[None]
