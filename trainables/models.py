"""The paper's networks, built by name for any (classes, channels, image size).

Inputs are images in [0, 1] (no mean/std normalisation), so attacks clamp to that range.
None of the models has dropout, so the trained function is deterministic in eval mode,
which the exact Hessian analysis needs.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


class LeNet5(nn.Module):
    """M1, the paper's MNIST network: LeNet-5 (LeCun et al. 1998) with ReLU and max-pooling.

    Both 5x5 convolutions use 'same' padding so the network also fits 8x8 digits;
    on 28x28 MNIST this is the common padded LeNet-5 (6 and 16 maps, FC 120-84-classes).
    """

    def __init__(self, num_classes: int, in_channels: int, image_size: int) -> None:
        super().__init__()
        if image_size < 4:
            raise ValueError(f"m1 needs image_size >= 4, got {image_size}")
        self.conv1 = nn.Conv2d(in_channels, 6, kernel_size=5, padding=2)
        self.conv2 = nn.Conv2d(6, 16, kernel_size=5, padding=2)
        side = image_size // 2 // 2
        self.fc1 = nn.Linear(16 * side * side, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for a batch of images."""
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


class C1(nn.Module):
    """C1 from the authors' code (amirgholami/HessianFlow, models/c1.py, `c1_model`).

    Two 5x5 conv(64) each followed by ReLU, BatchNorm and 3x3/2 max-pool (padding 1),
    then FC 384-192-classes; the flattened size follows the image size (64x8x8 on CIFAR).
    """

    def __init__(self, num_classes: int, in_channels: int, image_size: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, kernel_size=5, padding=2)
        self.bn1 = nn.BatchNorm2d(64)
        self.conv2 = nn.Conv2d(64, 64, kernel_size=5, padding=2)
        self.bn2 = nn.BatchNorm2d(64)
        side = _pool_out(_pool_out(image_size, 3, 2, 1), 3, 2, 1)
        self.fc1 = nn.Linear(64 * side * side, 384)
        self.fc2 = nn.Linear(384, 192)
        self.fc3 = nn.Linear(192, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for a batch of images."""
        x = F.max_pool2d(self.bn1(F.relu(self.conv1(x))), 3, 2, 1)
        x = F.max_pool2d(self.bn2(F.relu(self.conv2(x))), 3, 2, 1)
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


class C2(nn.Module):
    """C2 from the authors' code (amirgholami/HessianFlow, models/c1.py, `c2_model`).

    Unpadded 3x3 convs 64-64-128-128, each followed by ReLU and BatchNorm, 2x2 max-pool
    after the 2nd and 4th, then FC 256-256-classes (128x5x5 inputs on CIFAR). The authors'
    dropout layers are unused in their forward pass and are left out here too.
    """

    min_image_size = 16

    def __init__(self, num_classes: int, in_channels: int, image_size: int) -> None:
        super().__init__()
        if image_size < self.min_image_size:
            raise ValueError(
                f"c2 needs image_size >= {self.min_image_size} (four unpadded 3x3 convs and "
                f"two 2x2 pools), got {image_size}"
            )
        self.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3)
        self.bn1 = nn.BatchNorm2d(64)
        self.conv2 = nn.Conv2d(64, 64, kernel_size=3)
        self.bn2 = nn.BatchNorm2d(64)
        self.conv3 = nn.Conv2d(64, 128, kernel_size=3)
        self.bn3 = nn.BatchNorm2d(128)
        self.conv4 = nn.Conv2d(128, 128, kernel_size=3)
        self.bn4 = nn.BatchNorm2d(128)
        side = ((image_size - 4) // 2 - 4) // 2
        self.fc1 = nn.Linear(128 * side * side, 256)
        self.fc2 = nn.Linear(256, 256)
        self.fc3 = nn.Linear(256, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for a batch of images."""
        x = self.bn1(F.relu(self.conv1(x)))
        x = F.max_pool2d(self.bn2(F.relu(self.conv2(x))), 2)
        x = self.bn3(F.relu(self.conv3(x)))
        x = F.max_pool2d(self.bn4(F.relu(self.conv4(x))), 2)
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity (or 1x1 conv-BN projection) shortcut."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Residual block output."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """CIFAR ResNet of depth 6n+2 (He et al. 2016, section 4.2), as in the authors' code.

    The authors' models/resnet.py (from bearpaw/pytorch-classification) uses basic blocks
    with 16-32-64 channels and 1x1 conv projections when the shape changes; the final
    pooling here is adaptive so smaller images work too.
    """

    def __init__(self, depth: int, num_classes: int, in_channels: int, image_size: int) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 with n >= 1, got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        layers: list[nn.Module] = []
        in_planes = 16
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            for i in range(n):
                layers.append(BasicBlock(in_planes, planes, stride if i == 0 else 1))
                in_planes = planes
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for a batch of images."""
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layers(x)
        x = F.adaptive_avg_pool2d(x, 1)
        return self.fc(torch.flatten(x, 1))


class MLP(nn.Module):
    """A small fully connected ReLU network (64-64 hidden units), without BatchNorm."""

    hidden = (64, 64)

    def __init__(self, num_classes: int, in_channels: int, image_size: int) -> None:
        super().__init__()
        sizes = [in_channels * image_size * image_size, *self.hidden]
        layers: list[nn.Module] = [nn.Flatten()]
        for a, b in itertools.pairwise(sizes):
            layers += [nn.Linear(a, b), nn.ReLU()]
        layers.append(nn.Linear(sizes[-1], num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for a batch of images."""
        return self.net(x)


def _pool_out(size: int, kernel: int, stride: int, padding: int) -> int:
    """Output side length of a max-pool layer."""
    return (size + 2 * padding - kernel) // stride + 1


def _resnet20(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    """ResNet-20 (n = 3)."""
    return CifarResNet(20, num_classes, in_channels, image_size)


ModelFactory = Callable[[int, int, int], nn.Module]

MODELS: dict[str, ModelFactory] = {
    "m1": LeNet5,
    "c1": C1,
    "c2": C2,
    "resnet20": _resnet20,
    "mlp": MLP,
}


def model_names() -> tuple[str, ...]:
    """The names `build_model` accepts, sorted."""
    return tuple(sorted(MODELS))


def build_model(name: str, num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    """A freshly initialised model by registry name (initialised from torch's global RNG)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(model_names())}")
    for label, value in (
        ("num_classes", num_classes),
        ("in_channels", in_channels),
        ("image_size", image_size),
    ):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{label} must be a positive integer, got {value!r}")
    return MODELS[name](num_classes, in_channels, image_size)


def check_fits(name: str, num_classes: int, in_channels: int, image_size: int) -> None:
    """Raise ValueError when model ``name`` cannot classify images of this shape, so a spec
    is checked up front. It is built and run on the meta device (no memory, no arithmetic);
    a model that cannot run there (an operation without a meta kernel, a data-dependent
    branch) is run on two CPU images instead."""
    shape = (2, in_channels, image_size, image_size)
    try:
        with torch.device("meta"):
            out = build_model(name, num_classes, in_channels, image_size)(torch.empty(shape))
    except ValueError:
        raise
    except Exception:  # anything the meta device cannot do: try for real
        try:
            with torch.no_grad():
                out = build_model(name, num_classes, in_channels, image_size)(torch.zeros(shape))
        except ValueError:
            raise
        except Exception as err:  # the model's own error, reported as bad input
            first = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise ValueError(
                f"{name} cannot take {in_channels}x{image_size}x{image_size} images: {first}"
            ) from None
    if tuple(out.shape) != (2, num_classes):
        raise ValueError(
            f"{name} gives outputs of shape {tuple(out.shape[1:])} for "
            f"{in_channels}x{image_size}x{image_size} images, not {num_classes} logits"
        )


def count_parameters(model: nn.Module) -> int:
    """Number of trainable scalars (the dimension of the weight Hessian)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def build_seeded_model(
    name: str, num_classes: int, in_channels: int, image_size: int, seed: int
) -> nn.Module:
    """`build_model` with initial weights fixed by `seed`, leaving the global RNG untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_model(name, num_classes, in_channels, image_size)


__all__ = [
    "C1",
    "C2",
    "MLP",
    "MODELS",
    "CifarResNet",
    "LeNet5",
    "build_model",
    "build_seeded_model",
    "check_fits",
    "count_parameters",
    "model_names",
]
