"""Teacher ANNs: an architecture registry, input normalisation and safe checkpoint loading.

A teacher is described by a :class:`TeacherSpec` (architecture, checkpoint, normalisation,
input shape, class names). Every architecture exposes ``penultimate(x)`` (the globally
average-pooled features that RCA compares, B x d) and ``head`` (the classifier), with
``forward(x) == head(penultimate(x))``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .errors import CheckpointError, ConfigError
from .fileio import load_torch

# Per-channel (mean, std) of pixels in [0, 1]; the teacher saw (x - mean) / std in training.
NORMALIZATIONS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    # scikit-learn digits scaled from 0..16 to [0, 1], measured over all 1797 images
    "digits": ((0.3053,), (0.3760,)),
    "none": ((0.0,), (1.0,)),
}

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck")
DIGITS_CLASSES = tuple(str(d) for d in range(10))


class DigitsCNN(nn.Module):
    """A small BatchNorm CNN for 1x8x8 digits: three conv-BN-ReLU layers, GAP, linear."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 32):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(2 * width)
        self.conv3 = nn.Conv2d(2 * width, 2 * width, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(2 * width)
        self.head = nn.Linear(2 * width, num_classes)

    def penultimate(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = F.relu(self.bn3(self.conv3(x)))
        return x.mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.penultimate(x))


class _BasicBlock(nn.Module):
    """He et al. 2016 CIFAR block, "option A" shortcut: subsample and zero-pad channels."""

    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.pad_channels = (planes - in_planes) // 2 if stride != 1 or in_planes != planes else 0
        self.downsample = stride != 1 or in_planes != planes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x
        if self.downsample:
            shortcut = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad_channels, self.pad_channels))
        return F.relu(out + shortcut)


class CifarResNet(nn.Module):
    """CIFAR ResNet (depth 6n+2), key layout of akamaster/pytorch_resnet_cifar10; head = ``linear``."""

    def __init__(self, depth: int = 20, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        if (depth - 2) % 6:
            raise ConfigError(f"CIFAR ResNet depth {depth} is not 6n+2 (20, 32, 44, 56, 110)")
        blocks = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        stages, in_planes = [], 16
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            layers = []
            for index in range(blocks):
                layers.append(_BasicBlock(in_planes, planes, stride if index == 0 else 1))
                in_planes = planes
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3 = stages
        self.linear = nn.Linear(64, num_classes)

    @property
    def head(self) -> nn.Linear:
        return self.linear

    def penultimate(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return x.mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.penultimate(x))


@dataclass(frozen=True)
class Architecture:
    """A registered teacher architecture and the defaults that come with it."""

    build: Callable[[int, int], nn.Module]  # (num_classes, in_channels) -> module
    input_shape: tuple[int, int, int]
    normalization: str
    class_names: tuple[str, ...]
    hflip: bool  # whether horizontal flips are label-preserving for this kind of data


ARCHITECTURES: dict[str, Architecture] = {
    "digits_cnn": Architecture(lambda n, c: DigitsCNN(n, c), (1, 8, 8), "digits", DIGITS_CLASSES, False),
    **{
        f"cifar_resnet{depth}": Architecture(
            (lambda d: lambda n, c: CifarResNet(d, n, c))(depth),
            (3, 32, 32), "imagenet", CIFAR10_CLASSES, True)
        for depth in (20, 32, 44, 56, 110)
    },
}


def parse_normalization(text: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """A preset name (``imagenet``, ``cifar10``, ...) or ``"m1,m2,m3/s1,s2,s3"``."""
    if text in NORMALIZATIONS:
        return NORMALIZATIONS[text]
    try:
        mean_text, std_text = text.split("/")
        mean = tuple(float(v) for v in mean_text.split(","))
        std = tuple(float(v) for v in std_text.split(","))
    except ValueError:
        raise ConfigError(
            f"--normalization {text!r} is neither a preset ({', '.join(NORMALIZATIONS)}) "
            "nor 'mean1,mean2,.../std1,std2,...'"
        ) from None
    if len(mean) != len(std) or any(s <= 0 for s in std):
        raise ConfigError(f"--normalization {text!r}: mean and std need the same length and std > 0")
    return mean, std


@dataclass(frozen=True)
class TeacherSpec:
    """Everything needed to rebuild a teacher: JSON-friendly, stored in every run manifest."""

    arch: str = "digits_cnn"
    weights: str | None = None  # None: the cached digits teacher (``stars-deploy teacher train``)
    normalization: str = ""  # preset or "m,m,m/s,s,s"; "" = the architecture's default
    num_classes: int = 10
    class_names: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self):
        if self.arch not in ARCHITECTURES:
            raise ConfigError(
                f"unknown teacher architecture {self.arch!r}; choose one of {', '.join(ARCHITECTURES)}")
        if self.num_classes < 2:
            raise ConfigError(f"--num-classes must be at least 2, got {self.num_classes}")

    @property
    def architecture(self) -> Architecture:
        return ARCHITECTURES[self.arch]

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return self.architecture.input_shape

    @property
    def mean_std(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        mean, std = parse_normalization(self.normalization or self.architecture.normalization)
        channels = self.input_shape[0]
        if len(mean) == 1:
            mean, std = mean * channels, std * channels
        if len(mean) != channels:
            raise ConfigError(
                f"normalization {self.normalization!r} has {len(mean)} channels but "
                f"{self.arch} takes {channels}")
        return mean, std

    @property
    def classes(self) -> tuple[str, ...]:
        names = self.class_names or self.architecture.class_names
        return names if len(names) == self.num_classes else tuple(str(i) for i in range(self.num_classes))


class Normalizer(nn.Module):
    """x in [0, 1] -> (x - mean) / std, and the valid range of normalised pixels."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(-1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(-1, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return (images - self.mean) / self.std

    def bounds(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised values of pixel 0 and pixel 1, shape (C, 1, 1)."""
        return -self.mean / self.std, (1 - self.mean) / self.std


def _strip_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if state and all(key.startswith("module.") for key in state):
        return {key[len("module."):]: value for key, value in state.items()}
    return state


def fit_state_dict(model: nn.Module, state: dict, source: str) -> None:
    """Load ``state`` into ``model`` strictly, tolerating a ``module.`` prefix and missing
    ``num_batches_tracked``; otherwise raise one CheckpointError listing every problem."""
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{source} holds no state_dict of tensors")
    state = _strip_prefix(state)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    misshaped = [f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}"
                 for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if missing or unexpected or misshaped:
        def show(items):
            return ", ".join(items[:6]) + (f" (+{len(items) - 6} more)" if len(items) > 6 else "") or "none"
        raise CheckpointError(
            f"{source} does not fit {type(model).__name__}: missing keys: {show(missing)}; "
            f"unexpected keys: {show(unexpected)}; mis-shaped keys: {show(misshaped)}. "
            "Check --teacher/--num-classes against the checkpoint")
    model.load_state_dict(state, strict=False)


def build_teacher(spec: TeacherSpec) -> nn.Module:
    """An untrained module of the spec's architecture."""
    return spec.architecture.build(spec.num_classes, spec.input_shape[0])


def load_teacher(spec: TeacherSpec, weights: Path) -> nn.Module:
    """Build the architecture and load ``weights`` with ``weights_only=True``; eval mode, frozen."""
    model = build_teacher(spec)
    fit_state_dict(model, load_torch(weights, "teacher checkpoint"), f"teacher checkpoint {weights}")
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


def batchnorm_layers(model: nn.Module) -> list[tuple[str, nn.BatchNorm2d]]:
    """Every BatchNorm2d of the teacher with its qualified name, in forward order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
