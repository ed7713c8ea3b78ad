"""The single source of truth for the classifier: its classes, its input normalisation and its network.

Every later stage (export, handler, load test) imports these names or reads them back from the
checkpoint's metadata, so that a change here cannot silently diverge between training and serving.
"""
from __future__ import annotations

from torch import nn
from torchvision.models import resnet18

CLASSES: tuple[str, ...] = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)
# Per-channel mean and std of the CIFAR-10 training set, RGB, for pixels scaled to [0, 1].
MEAN: tuple[float, float, float] = (0.4914, 0.4822, 0.4465)
STD: tuple[float, float, float] = (0.2470, 0.2435, 0.2616)
IMAGE_SIZE = 32
ARCHITECTURE = "resnet18-cifar"


def build_model(num_classes: int = len(CLASSES)) -> nn.Module:
    """torchvision's ResNet18 adapted to 32x32 inputs: 3x3 stride-1 stem and no max-pool.

    The ImageNet stem (7x7 stride 2 + max-pool) would shrink a 32x32 image to 8x8 before the first
    residual stage and cost several accuracy points on CIFAR.
    """
    model = resnet18(num_classes=num_classes)
    model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())

