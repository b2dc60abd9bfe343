"""A plain-PyTorch architecture package for fetch_model's `source: torch_package` tests (`tiny_torch_arch:TinyConvNet`):
a conv, batch norm, ReLU6, pooling and a linear head, like a very small EfficientNet-Lite."""

from __future__ import annotations

import torch


class TinyConvNet(torch.nn.Module):
    def __init__(self, width: int = 4, classes: int = 10):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, width, 3, stride=2, padding=1, bias=False)
        self.bn = torch.nn.BatchNorm2d(width)
        self.fc = torch.nn.Linear(width, classes)

    def forward(self, x):
        x = torch.nn.functional.relu6(self.bn(self.conv(x)))
        return self.fc(x.mean(dim=(2, 3)))
