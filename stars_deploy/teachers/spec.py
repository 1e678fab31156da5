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

from .adapters import ClassifierTeacher, check_teacher, program_teacher
from .models import CIFAR10_CLASSES, DIGITS_CLASSES, CifarResNet, DigitsCNN
from .sources import FACTORY, MODULE, PROGRAM, SOURCES, call_factory, held_module

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
    """Everything needed to rebuild a teacher: JSON-friendly, stored in every run manifest.

    ``arch`` is a named architecture (ARCHITECTURES), or a source of another classifier
    (sources.py): ``factory`` (``factory`` = "package.module:function"), ``program``
    (``weights`` = a torch.export .pt2 file) or ``module`` (a module passed from Python,
    ``factory`` = the key it is held under). Those need ``shape`` (C, H, W), except a program
    whose input shape is fixed; ``hflip`` says whether horizontal flips keep the label (the
    architecture's, else on for 3-channel images)."""

    arch: str = "digits_cnn"
    weights: str | None = None  # None: the cached digits teacher (``stars-deploy teacher train``)
    normalization: str = ""  # preset or "m,m,m/s,s,s"; "" = the architecture's default
    num_classes: int = 10
    class_names: tuple[str, ...] = field(default_factory=tuple)
    factory: str | None = None
    shape: tuple[int, int, int] | None = None
    hflip: bool | None = None

    def __post_init__(self):
        if self.arch not in ARCHITECTURES and self.arch not in SOURCES:
            raise ConfigError(
                f"unknown teacher architecture {self.arch!r}; choose one of {', '.join(ARCHITECTURES)}, "
                "or give package.module:function or a .pt2 file")
        if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int) or self.num_classes < 2:
            raise ConfigError(f"--num-classes must be at least 2, got {self.num_classes}")
        if self.shape is not None:
            object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
            if len(self.shape) != 3 or min(self.shape) < 1:
                raise ConfigError(f"--input-shape {self.shape}: give C,H,W, three positive integers")
        if self.arch in (FACTORY, MODULE) and self.shape is None:
            raise ConfigError(f"a teacher from {self.factory or self.arch} needs --input-shape C,H,W")
        if self.arch in (FACTORY, MODULE) and not self.factory:
            raise ConfigError("a factory teacher needs its package.module:function")
        if self.arch == PROGRAM and not self.weights:
            raise ConfigError("a program teacher needs its .pt2 file")

    @property
    def named(self) -> bool:
        return self.arch in ARCHITECTURES

    @property
    def architecture(self) -> Architecture:
        if self.named:
            return ARCHITECTURES[self.arch]
        shape = self.shape or (3, 32, 32)
        return Architecture(build=None, input_shape=shape, normalization="none", class_names=(),
                            hflip=shape[0] == 3)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return self.shape or self.architecture.input_shape

    @property
    def flips(self) -> bool:
        """Whether horizontal flips keep the label (used by synthesis and KD augmentation)."""
        return self.architecture.hflip if self.hflip is None else self.hflip

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
    """An untrained module of the spec's (named) architecture."""
    if not spec.named:
        raise ConfigError(f"a {spec.arch} teacher has no architecture to build: it is loaded as given")
    return spec.architecture.build(spec.num_classes, spec.input_shape[0])


def check_finite_weights(model: nn.Module, source: str) -> None:
    """Every floating-point parameter and buffer of ``model`` finite, or a CheckpointError naming
    the first tensor that holds NaN or an infinity (a teacher with one computes NaN everywhere)."""
    for name, tensor in (*model.named_parameters(), *model.named_buffers()):
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise CheckpointError(f"{source}: {name} holds {bad} NaN or infinite value(s) of {tensor.numel()}; "
                                  "the checkpoint is broken (a diverged training?): use another one")


def _source_teacher(spec: TeacherSpec, weights: Path | None) -> nn.Module:
    """A teacher from a factory, a program or a held module, with penultimate/head, checked."""
    if spec.arch == PROGRAM:
        model, _ = program_teacher(Path(spec.weights), spec.shape)
        source = spec.weights
    else:
        model = call_factory(spec.factory) if spec.arch == FACTORY else held_module(spec.factory)
        source = spec.factory.split("#")[0]
        if weights is not None:
            fit_state_dict(model, load_torch(weights, "teacher checkpoint"), f"teacher checkpoint {weights}")
        model = ClassifierTeacher(model.eval(), torch.zeros(2, *spec.input_shape), source)
    check_teacher(model, spec.input_shape, spec.num_classes, source)
    return model


def load_teacher(spec: TeacherSpec, weights: Path | None) -> nn.Module:
    """The spec's teacher, eval mode, frozen: a named architecture built and ``weights`` loaded
    with ``weights_only=True``, or a classifier from another source (sources.py). NaN or
    infinite weights are refused, naming the tensor; a named architecture too large for memory
    (``--num-classes 10**9``) is refused before it is allocated."""
    if spec.named:
        require(4 * parameter_count(on_meta(lambda: build_teacher(spec))), torch.device("cpu"),
                f"teacher {spec.arch} with {spec.num_classes} classes", "check --num-classes")
        model = build_teacher(spec)
        fit_state_dict(model, load_torch(weights, "teacher checkpoint"), f"teacher checkpoint {weights}")
    else:
        model = _source_teacher(spec, weights if spec.arch != PROGRAM else None)
    check_finite_weights(model, f"teacher checkpoint {weights or spec.weights or spec.factory}")
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


def batchnorm_layers(model: nn.Module) -> list[tuple[str, nn.BatchNorm2d]]:
    """Every BatchNorm2d of the teacher with its qualified name, in forward order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
