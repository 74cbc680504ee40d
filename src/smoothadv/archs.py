"""Network definitions (without normalization; `models.build_model` prepends it).

- `fashion_cnn`: a small two-convolution CNN for 1x28x28 inputs, fast enough to train and certify
  on a laptop CPU (about 0.1 M parameters, about 1 M multiply-adds per image).
- `lenet`: the LeNet the certified-training papers use on MNIST and Fashion-MNIST (conv5x5(20) - pool -
  conv5x5(50) - pool - fc(500) - fc(classes), no BatchNorm, 431,080 parameters); parameter names
  `conv1`, `conv2`, `fc1`, `fc2` as in the released code of Jeong & Shin (2020) and its successors.
- `toy_cnn`: a tiny CNN for the synthetic test dataset.
- `cifar_resnet20` / `cifar_resnet110`: the CIFAR ResNet family (depth 6k+2, BasicBlock, widths
  16/32/64, 8x8 average pooling) used by Cohen et al. and Salman et al.; parameter names match
  their released checkpoints (`conv1`, `bn1`, `layer1..3`, `downsample.0/1`, `fc`).
- `resnet50`: torchvision's ResNet-50 (ImageNet), as in both papers.

Every fact about an architecture (constructor, classifier head, the dataset it is built for, whether
Cohen's/Salman's checkpoints of it exist) sits in its `ArchInfo` entry of the registry `ARCHITECTURES`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor, nn

from .errors import SmoothAdvError
from .settings import register_names

__all__ = [
    "ARCHITECTURES", "ArchInfo", "BasicBlock", "CifarResNet", "FashionCNN", "LeNet", "ToyCNN", "arch_info",
    "architecture_names", "foreign_names",
]


class FashionCNN(nn.Module):
    """conv3x3(16) - ReLU - maxpool - conv3x3(32) - ReLU - maxpool - fc(64) - ReLU - fc(classes)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 16, image_size: int = 28) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        )
        side = image_size // 4
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(2 * width * side * side, 64), nn.ReLU(inplace=True), nn.Linear(64, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


class LeNet(nn.Module):
    """LeNet for 1x28x28 inputs: two valid 5x5 convolutions (20, 50 channels), each followed by ReLU and a
    2x2 max-pool, then fc(800 -> 500) - ReLU - fc(500 -> classes)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 20, 5)
        self.conv2 = nn.Conv2d(20, 50, 5)
        self.fc1 = nn.Linear(50 * 4 * 4, 500)
        self.fc2 = nn.Linear(500, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        pool = nn.functional.max_pool2d
        x = pool(torch.relu(self.conv1(x)), 2)
        x = pool(torch.relu(self.conv2(x)), 2)
        return self.fc2(torch.relu(self.fc1(torch.flatten(x, 1))))


class ToyCNN(nn.Module):
    """A tiny CNN for 3x8x8 synthetic images: conv3x3(8) - ReLU - maxpool - fc(classes)."""

    def __init__(self, num_classes: int = 4, in_channels: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 4 * 4, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.flatten(nn.functional.max_pool2d(torch.relu(self.conv(x)), 2), 1))


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class CifarResNet(nn.Module):
    """CIFAR ResNet of depth 6k+2 with BasicBlocks (He et al. 2016, Section 4.2)."""

    def __init__(self, depth: int, num_classes: int = 10) -> None:
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6k+2, got {depth}")
        blocks = (depth - 2) // 6
        self.in_planes = 16
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(16, blocks, 1)
        self.layer2 = self._make_layer(32, blocks, 2)
        self.layer3 = self._make_layer(64, blocks, 2)
        self.avgpool = nn.AvgPool2d(8)
        self.fc = nn.Linear(64, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels
                module.weight.data.normal_(0, math.sqrt(2.0 / fan_out))
            elif isinstance(module, nn.BatchNorm2d):
                module.weight.data.fill_(1)
                module.bias.data.zero_()

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.in_planes != planes:
            downsample = nn.Sequential(
                nn.Conv2d(self.in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )
        layers = [BasicBlock(self.in_planes, planes, stride, downsample)]
        self.in_planes = planes
        layers += [BasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _resnet50(num_classes: int) -> nn.Module:
    from torchvision.models import resnet50

    return resnet50(weights=None, num_classes=num_classes)


@dataclass(frozen=True)
class ArchInfo:
    """Everything smoothadv knows about one architecture; `ARCHITECTURES` holds one per name.

    Attributes:
        name: the registry key, also recorded in checkpoints (`arch`), as in Cohen's and Salman's files.
        build: constructor taking the number of classes; returns the network without normalization.
        head: attribute path (dots, digits index a Sequential) from the network to its final
            `nn.Linear`, which has `num_classes` outputs and is replaced when fine-tuning.
        dataset: the dataset (a `data.DATASETS` key) whose images (`input_shape`) it takes.
        foreign: whether Cohen et al.'s and Salman et al.'s code defines it under this name; their
            checkpoint files record no dataset, so those of this architecture are read as trained on `dataset`.
    """

    name: str
    build: Callable[[int], nn.Module]
    head: str
    dataset: str
    foreign: bool = False


ARCHITECTURES: dict[str, ArchInfo] = {info.name: info for info in (
    ArchInfo("fashion_cnn", FashionCNN, "classifier.3", "fashion_mnist"),
    ArchInfo("lenet", LeNet, "fc2", "fashion_mnist"),
    ArchInfo("toy_cnn", ToyCNN, "fc", "synthetic"),
    ArchInfo("cifar_resnet20", partial(CifarResNet, 20), "fc", "cifar10", foreign=True),
    ArchInfo("cifar_resnet110", partial(CifarResNet, 110), "fc", "cifar10", foreign=True),
    ArchInfo("imagenet32_resnet110", partial(CifarResNet, 110), "fc", "imagenet32", foreign=True),
    ArchInfo("resnet50", _resnet50, "fc", "imagenet", foreign=True),
)}
"""Architecture name -> ArchInfo. `imagenet32_resnet110` is `cifar_resnet110`'s network; the name marks Salman
et al.'s checkpoints pretrained on ImageNet32 (1000 classes)."""


def arch_info(name: str) -> ArchInfo:
    """The registry entry `ARCHITECTURES[name]`; an unknown name is a one-line SmoothAdvError listing the known ones."""
    info = ARCHITECTURES.get(name)
    if info is None:
        raise SmoothAdvError(f"unknown architecture {name!r}; choose one of {', '.join(architecture_names())}")
    return info


def architecture_names() -> tuple[str, ...]:
    """Names of every registered architecture, in registry order (the CLI's `--arch` choices)."""
    return tuple(ARCHITECTURES)


register_names("arch", architecture_names)


def foreign_names() -> tuple[str, ...]:
    """Names of the architectures whose Cohen/Salman-format checkpoint files `models.load_checkpoint` reads."""
    return tuple(name for name, info in ARCHITECTURES.items() if info.foreign)
