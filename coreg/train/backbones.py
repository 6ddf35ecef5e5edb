"""Feature extractors for Co-Reg: the paper's PreAct ResNet-18 and a small CPU-friendly CNN.

Both map an image batch (B, C, H, W) to a feature vector (B, F); the classifier and the
projection head live in :mod:`coreg.train.network`, so a backbone only has to say how wide
its features are.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from coreg.errors import CoregError

BACKBONES = ("preact_resnet18", "small_cnn")


def _conv3x3(in_planes: int, planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)


class PreActBlock(nn.Module):
    """Pre-activation basic block (BN-ReLU-conv twice), the ResNet-v2 unit the paper uses."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = _conv3x3(in_planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        # The projection shortcut sees the pre-activated input, as in the pre-activation paper.
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class PreActResNet18(nn.Module):
    """PreAct ResNet-18 with a 3x3 stem (no max-pool), as used for 32 px images.

    For inputs larger than 32 px (the paper's 64 px case) layer1 gets stride 2 so the
    feature maps of the later layers keep the sizes they have at 32 px.
    """

    feature_dim = 512

    def __init__(self, in_channels: int = 3, image_size: int = 32) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_channels, 64)
        first_stride = 1 if image_size <= 32 else 2
        self.in_planes = 64
        self.layer1 = self._make_layer(64, first_stride)
        self.layer2 = self._make_layer(128, 2)
        self.layer3 = self._make_layer(256, 2)
        self.layer4 = self._make_layer(512, 2)
        self.bn = nn.BatchNorm2d(512)

    def _make_layer(self, planes: int, stride: int) -> nn.Sequential:
        blocks = [PreActBlock(self.in_planes, planes, stride), PreActBlock(planes, planes, 1)]
        self.in_planes = planes
        return nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(x)
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = F.relu(self.bn(out))  # pre-activation nets need a final BN-ReLU before pooling
        return F.adaptive_avg_pool2d(out, 1).flatten(1)


class SmallCNN(nn.Module):
    """Three conv-BN-ReLU blocks (32-64-feature_dim) and global average pooling.

    Two 2x max-pools keep it cheap on a CPU; the adaptive pool accepts any input of at
    least 8 px, so the same network serves 8, 16 and 32 px data.
    """

    def __init__(self, in_channels: int = 1, feature_dim: int = 128) -> None:
        super().__init__()
        self.feature_dim = feature_dim
        self.features = nn.Sequential(
            *self._block(in_channels, 32), nn.MaxPool2d(2),
            *self._block(32, 64), nn.MaxPool2d(2),
            *self._block(64, feature_dim),
        )

    @staticmethod
    def _block(in_ch: int, out_ch: int) -> list[nn.Module]:
        return [nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False), nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(self.features(x), 1).flatten(1)


def build_backbone(name: str, in_channels: int, image_size: int) -> tuple[nn.Module, int]:
    """Return ``(module, feature_dim)`` for a backbone name from :data:`BACKBONES`."""
    if in_channels not in (1, 3):
        raise CoregError(f"backbone {name!r}: in_channels must be 1 or 3, got {in_channels}")
    if name == "preact_resnet18":
        return PreActResNet18(in_channels, image_size), PreActResNet18.feature_dim
    if name == "small_cnn":
        if image_size < 8:
            raise CoregError(f"backbone 'small_cnn' needs images of at least 8 px, got {image_size}")
        net = SmallCNN(in_channels)
        return net, net.feature_dim
    raise CoregError(f"unknown backbone {name!r}; expected one of {', '.join(BACKBONES)}")
