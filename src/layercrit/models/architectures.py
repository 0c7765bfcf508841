"""Architectures bundled with layercrit (spec ``layercrit:NAME``), named like torchvision's ResNets."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from .base import Preprocessing

FMNIST_MEAN = (0.2860,)
FMNIST_STD = (0.3530,)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class SmallResNet(nn.Module):
    """CIFAR-style ResNet (He et al. 2016, §4.2) for small greyscale images: 3 stages of 16/32/64 channels."""

    def __init__(self, depth: int = 20, num_classes: int = 10, in_chans: int = 1, width: int = 16):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError("depth must be 6n + 2")
        blocks = (depth - 2) // 6
        self.num_classes = num_classes
        self.conv1 = nn.Conv2d(in_chans, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        planes = [width, 2 * width, 4 * width]
        self.layer1 = self._stage(width, planes[0], blocks, 1)
        self.layer2 = self._stage(planes[0], planes[1], blocks, 2)
        self.layer3 = self._stage(planes[1], planes[2], blocks, 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(planes[2], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    @staticmethod
    def _stage(in_planes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [BasicBlock(in_planes, planes, stride)]
        layers += [BasicBlock(planes, planes) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.avgpool(x).flatten(1))

    def forward_features(self, x):
        """Pooled features before the classifier (used by the linear-probe training methods)."""
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.avgpool(x).flatten(1)


_FMNIST = Preprocessing(resize=None, crop=None, mean=FMNIST_MEAN, std=FMNIST_STD, in_chans=1,
                        source="Fashion-MNIST native 28x28, dataset mean/std")

ARCHITECTURES: dict[str, tuple[Callable[..., nn.Module], Preprocessing]] = {
    "fmnist_resnet20": (lambda **kw: SmallResNet(depth=20, **kw), _FMNIST),
    "fmnist_resnet8": (lambda **kw: SmallResNet(depth=8, **kw), _FMNIST),
}
