"""Networks of the training-step benchmark, from their papers' shapes (no weights, no downloads).

* :func:`resnet20`: the CIFAR ResNet of He et al. (2016, section 4.2) for
  32x32 input: a 3x3 stem of 16 channels, three stages of 16/32/64 channels
  with 3 basic blocks each, global pooling, one linear layer. Where a stage
  halves the resolution, the shortcut is a strided 1x1 convolution with batch
  norm (the paper's option B). 21 batch-norm layers.
* :func:`mobilenet_v2`: MobileNetV2 of Sandler et al. (2018), width 1.0,
  inverted residual blocks (1x1 expand, 3x3 depthwise, 1x1 linear project),
  adapted to 32x32 input as is usual for CIFAR: stride 1 in the stem and in
  the 24-channel stage, so the last feature map is 4x4. 52 batch-norm layers.
* :func:`resnet18`: the ImageNet ResNet-18 topology (7x7 stride-2 stem, max
  pool, four stages of 64/128/256/512 channels with 2 basic blocks each), here
  on 112x112 input. 20 batch-norm layers.

All use plain ``torch.nn.BatchNorm2d``; the benchmark converts them. The
default is 10 classes for every network (ResNet-18 included: its 1000-way
head would only add a large linear layer to every step, which says nothing
about normalization).
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch import nn
from torch.nn.functional import relu, relu6

__all__ = ["NETWORKS", "BasicBlock", "InvertedResidual", "MobileNetV2", "NetworkSpec", "ResNet",
           "count_batchnorms", "mobilenet_v2", "resnet18", "resnet20"]


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with batch norm, and the identity (or a 1x1 projection) added."""

    def __init__(self, in_channels: int, channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.downsample: nn.Module = nn.Identity()
        if stride != 1 or in_channels != channels:
            self.downsample = nn.Sequential(nn.Conv2d(in_channels, channels, 1, stride, bias=False),
                                            nn.BatchNorm2d(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = self.downsample(x)
        out = relu(self.bn1(self.conv1(x)))
        return relu(self.bn2(self.conv2(out)) + identity)


class ResNet(nn.Module):
    """A convolution stem, stages of :class:`BasicBlock`, global average pooling and a linear classifier.

    Args:
        stem_kernel: kernel size of the stem convolution (its stride is 2 when
            ``stem_pool``, as in the ImageNet ResNets, else 1).
        stem_channels: channels the stem puts out.
        stem_pool: a 3x3 stride-2 max pool after the stem.
        stages: ``(channels, blocks, stride of the first block)`` of each stage.
        num_classes: outputs of the classifier.
    """

    def __init__(self, stem_kernel: int, stem_channels: int, stem_pool: bool,
                 stages: list[tuple[int, int, int]], num_classes: int) -> None:
        super().__init__()
        stride = 2 if stem_pool else 1
        self.conv1 = nn.Conv2d(3, stem_channels, stem_kernel, stride, stem_kernel // 2, bias=False)
        self.bn1 = nn.BatchNorm2d(stem_channels)
        self.pool: nn.Module = nn.MaxPool2d(3, 2, 1) if stem_pool else nn.Identity()
        layers: list[nn.Module] = []
        in_channels = stem_channels
        for channels, blocks, first_stride in stages:
            for i in range(blocks):
                layers.append(BasicBlock(in_channels, channels, first_stride if i == 0 else 1))
                in_channels = channels
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(in_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(relu(self.bn1(self.conv1(x))))
        x = self.layers(x)
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def resnet20(num_classes: int = 10) -> ResNet:
    """ResNet-20 for 32x32 input (3x3 stem, 3 stages x 3 blocks, 16/32/64 channels)."""
    return ResNet(3, 16, False, [(16, 3, 1), (32, 3, 2), (64, 3, 2)], num_classes)


def resnet18(num_classes: int = 10) -> ResNet:
    """ResNet-18 (ImageNet topology: 7x7 stride-2 stem, max pool, 4 stages x 2 blocks)."""
    return ResNet(7, 64, True, [(64, 2, 1), (128, 2, 2), (256, 2, 2), (512, 2, 2)], num_classes)


class InvertedResidual(nn.Module):
    """1x1 expansion, 3x3 depthwise convolution, 1x1 linear projection; the input added
    when stride is 1 and the widths match. With expansion 1 there is no expansion layer."""

    def __init__(self, in_channels: int, channels: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = in_channels * expansion
        self.expand = expansion != 1
        if self.expand:
            self.conv1 = nn.Conv2d(in_channels, hidden, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(hidden)
        self.conv2 = nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False)
        self.bn2 = nn.BatchNorm2d(hidden)
        self.conv3 = nn.Conv2d(hidden, channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(channels)
        self.residual = stride == 1 and in_channels == channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = relu6(self.bn1(self.conv1(x))) if self.expand else x
        out = relu6(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return out + x if self.residual else out


# (expansion, channels, blocks, stride of the first block), the paper's table 2;
# the second row's stride is 1 instead of 2 for 32x32 input
MOBILENET_V2_STAGES: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


class MobileNetV2(nn.Module):
    """MobileNetV2, width 1.0, for 32x32 input (stride-1 stem)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(32)
        blocks: list[nn.Module] = []
        in_channels = 32
        for expansion, channels, count, stride in MOBILENET_V2_STAGES:
            for i in range(count):
                blocks.append(InvertedResidual(in_channels, channels, stride if i == 0 else 1, expansion))
                in_channels = channels
        self.blocks = nn.Sequential(*blocks)
        self.conv2 = nn.Conv2d(in_channels, 1280, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(1280)
        self.fc = nn.Linear(1280, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = relu6(self.bn1(self.conv1(x)))
        x = relu6(self.bn2(self.conv2(self.blocks(x))))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def mobilenet_v2(num_classes: int = 10) -> MobileNetV2:
    return MobileNetV2(num_classes)


class NetworkSpec(NamedTuple):
    """A benchmark network: how to build it, its input size, batch norms, default batch per process."""

    build: Callable[[int], nn.Module]  # num_classes -> the network
    image_size: int
    batchnorms: int
    batch: int
    num_classes: int = 10


NETWORKS: dict[str, NetworkSpec] = {
    "resnet20": NetworkSpec(resnet20, 32, 21, 8),
    "mobilenet_v2": NetworkSpec(mobilenet_v2, 32, 52, 8),
    "resnet18": NetworkSpec(resnet18, 112, 20, 4),
}


def count_batchnorms(model: nn.Module) -> int:
    """Batch-norm layers in ``model`` (any ``_BatchNorm`` subclass)."""
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
