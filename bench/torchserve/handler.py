"""TorchServe's stock image-classifier handler with the preprocessing of the model's own manifest.

The stock ``ImageClassifier`` resizes the short side to 256 (bilinear), crops 224 and normalises
with the ImageNet mean and std: exactly ResNet-50's preprocessing. EfficientNet-Lite0 was trained
with a bicubic resize and mean = std = 0.5, so ``preprocessing.json`` (packed into the archive from
the same manifest our server reads) sets the transform; everything else (decoding, batching,
top-5 postprocessing) is the stock handler's.

An archive made from a frozen TorchScript file (``"torchscript": true`` in ``preprocessing.json``;
the stock handler loads it with ``torch.jit.load``) gets its inputs in channels-last order and
runs without the profiling executor's re-optimisation, as our server runs the same frozen network.
"""

import json
import logging
import os

import torch
from torchvision import transforms
from ts.torch_handler.image_classifier import ImageClassifier

logger = logging.getLogger(__name__)


class ManifestImageClassifier(ImageClassifier):
    def initialize(self, context):
        super().initialize(context)
        with open(os.path.join(context.system_properties["model_dir"], "preprocessing.json")) as file:
            prep = json.load(file)
        self.image_processing = transforms.Compose([
            transforms.Resize(prep["resize_size"], interpolation=transforms.InterpolationMode(prep["interpolation"])),
            transforms.CenterCrop(prep["crop_size"]),
            transforms.ToTensor(),
            transforms.Normalize(mean=prep["mean"], std=prep["std"]),
        ])
        self.torchscript = prep.get("torchscript", False)
        # The benchmark checks this line to confirm the thread setting reached the worker.
        logger.info("bench handler ready: torch threads=%d", torch.get_num_threads())

    def inference(self, data, *args, **kwargs):
        if not self.torchscript:
            return super().inference(data, *args, **kwargs)
        with torch.inference_mode(), torch.jit.optimized_execution(False):
            return self.model(data.contiguous(memory_format=torch.channels_last), *args, **kwargs)
