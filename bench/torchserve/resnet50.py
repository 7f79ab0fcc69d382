"""ResNet-50 for TorchServe's eager-mode loader (one nn.Module class, built without arguments)."""

import torchvision
from torch import nn


class Network(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = torchvision.models.resnet50(weights=None, num_classes=1000)

    def forward(self, x):
        return self.net(x)
