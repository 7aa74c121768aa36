"""A small ResNet-style CNN with batch norm and a synthetic image data set, shared by the recipes.

No torchvision or timm (they do not install beside a pinned CPU torch here): two convolution stages, one
residual block, global average pooling. The data are 4 classes of 3x8x8 images, each class a fixed random
template plus noise, generated from a seed so every process and every run sees the same tensors.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class Block(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(x + self.bn2(self.conv2(out)))


class TinyResNet(nn.Module):
    def __init__(self, classes: int = 4, width: int = 8):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.block = Block(width)
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        return self.head(self.block(self.stem(x)).mean(dim=(2, 3)))


def images(n: int = 64, classes: int = 4, seed: int = 0):
    """(x, y): n images of shape 3x8x8 in ``classes`` classes, the same for a given seed."""
    g = torch.Generator().manual_seed(seed)
    templates = torch.randn(classes, 3, 8, 8, generator=g)
    y = torch.arange(n) % classes
    x = templates[y] + 0.8 * torch.randn(n, 3, 8, 8, generator=g)
    return x, y
