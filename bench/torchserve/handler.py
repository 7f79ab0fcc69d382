"""TorchServe's stock image-classifier handler with the preprocessing of the model's own manifest.

The stock ``ImageClassifier`` resizes the short side to 256 (bilinear), crops 224 and normalises
with the ImageNet mean and std: exactly ResNet-50's preprocessing. EfficientNet-Lite0 was trained
with a bicubic resize and mean = std = 0.5, so ``preprocessing.json`` (packed into the archive from
the same manifest our server reads) sets the transform; everything else (decoding, batching,
top-5 postprocessing) is the stock handler's.

``preprocessing.json`` also names the engine, by the archive's file:

- ``eager``: the stock handler's own loading and inference;
- ``torchscript``: a frozen TorchScript file (the stock handler loads it with ``torch.jit.load``),
  run on channels-last inputs without the profiling executor's re-optimisation, as our server
  runs the same frozen network with ``CLASSIFIER_RUNTIME=torch``;
- ``onnxruntime``: an ONNX graph. The stock handler opens it through ``setup_ort_session``, with
  one intra-op thread per core whatever the worker's setting, and its inference calls the session
  as a module, which an ONNX Runtime session is not. This handler has the stock loader open it
  with the worker's threads (``OMP_NUM_THREADS``) and the session options our server uses (one
  session per worker, as the stock handler keeps), and runs it.
"""

import json
import logging
import os

import torch
from torchvision import transforms
from ts.torch_handler import base_handler
from ts.torch_handler.image_classifier import ImageClassifier

logger = logging.getLogger(__name__)


def open_session(model_path, map_location):
    """The graph's session as our server opens it on a CPU: the worker's threads, no spinning."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return onnxruntime.InferenceSession(model_path, options, providers=["CPUExecutionProvider"])


class ManifestImageClassifier(ImageClassifier):
    def initialize(self, context):
        with open(os.path.join(context.system_properties["model_dir"], "preprocessing.json")) as file:
            prep = json.load(file)
        self.engine = prep["engine"]
        if self.engine == "onnxruntime":
            # What the stock loader calls for a .onnx file; replaced for this worker process for good
            # (a worker serves one model).
            base_handler.setup_ort_session = open_session
        super().initialize(context)
        if self.engine == "onnxruntime":
            self.input_name = self.model.get_inputs()[0].name
        self.image_processing = transforms.Compose([
            transforms.Resize(prep["resize_size"], interpolation=transforms.InterpolationMode(prep["interpolation"])),
            transforms.CenterCrop(prep["crop_size"]),
            transforms.ToTensor(),
            transforms.Normalize(mean=prep["mean"], std=prep["std"]),
        ])
        # The benchmark checks this line to confirm the thread setting reached the worker.
        logger.info("bench handler ready: engine=%s torch threads=%d", self.engine, torch.get_num_threads())

    def inference(self, data, *args, **kwargs):
        if self.engine == "onnxruntime":
            (logits, *_) = self.model.run(None, {self.input_name: data.numpy()})
            return torch.from_numpy(logits)
        if self.engine == "eager":
            return super().inference(data, *args, **kwargs)
        with torch.inference_mode(), torch.jit.optimized_execution(False):
            return self.model(data.contiguous(memory_format=torch.channels_last), *args, **kwargs)
