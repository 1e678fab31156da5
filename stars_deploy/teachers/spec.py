"""Teacher specs: the architecture registry, input normalisation and safe checkpoint loading.

A teacher is described by a :class:`TeacherSpec` (architecture, checkpoint, normalisation,
input shape, class names), stored in every run manifest; :func:`load_teacher` rebuilds it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from stars_deploy.errors import CheckpointError, ConfigError
from stars_deploy.fileio import fit_state_dict, load_torch
from stars_deploy.memory import on_meta, parameter_count, require

from .models import CIFAR10_CLASSES, DIGITS_CLASSES, CifarResNet, DigitsCNN

# Per-channel (mean, std) of pixels in [0, 1]; the teacher saw (x - mean) / std in training.
NORMALIZATIONS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    # scikit-learn digits scaled from 0..16 to [0, 1], measured over all 1797 images
    "digits": ((0.3053,), (0.3760,)),
    "none": ((0.0,), (1.0,)),
}

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
    if not all(math.isfinite(v) for v in mean + std):
        raise ConfigError(f"--normalization {text!r}: every mean and std must be a finite number")
    if len(mean) != len(std) or not all(s > 0 for s in std):
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
        if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int) or self.num_classes < 2:
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


def build_teacher(spec: TeacherSpec) -> nn.Module:
    """An untrained module of the spec's architecture."""
    return spec.architecture.build(spec.num_classes, spec.input_shape[0])


def check_finite_weights(model: nn.Module, source: str) -> None:
    """Every floating-point parameter and buffer of ``model`` finite, or a CheckpointError naming
    the first tensor that holds NaN or an infinity (a teacher with one computes NaN everywhere)."""
    for name, tensor in (*model.named_parameters(), *model.named_buffers()):
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise CheckpointError(f"{source}: {name} holds {bad} NaN or infinite value(s) of {tensor.numel()}; "
                                  "the checkpoint is broken (a diverged training?): use another one")


def load_teacher(spec: TeacherSpec, weights: Path) -> nn.Module:
    """Build the architecture and load ``weights`` with ``weights_only=True``; eval mode, frozen.
    NaN or infinite weights are refused, naming the layer; a size that cannot fit in memory
    (``--num-classes 10**9``) is refused before allocating it."""
    require(4 * parameter_count(on_meta(lambda: build_teacher(spec))), torch.device("cpu"),
            f"teacher {spec.arch} with {spec.num_classes} classes", "check --num-classes")
    model = build_teacher(spec)
    fit_state_dict(model, load_torch(weights, "teacher checkpoint"), f"teacher checkpoint {weights}")
    check_finite_weights(model, f"teacher checkpoint {weights}")
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


def batchnorm_layers(model: nn.Module) -> list[tuple[str, nn.BatchNorm2d]]:
    """Every BatchNorm2d of the teacher with its qualified name, in forward order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
