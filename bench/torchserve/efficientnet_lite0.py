"""EfficientNet-Lite0 (timm's ``tf_efficientnet_lite0``, as classifier/models.py builds it) for
TorchServe's eager-mode loader (one nn.Module class, built without arguments)."""

import timm
from torch import nn


class Network(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=1000)

    def forward(self, x):
        return self.net(x)
