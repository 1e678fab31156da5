"""What every spiking student shares: its config, its output, and the family registry.

A student *family* is one :class:`StudentFamily` record: how to build it, how to fold its
BatchNorm layers into its convolutions, and how to describe its graph for export
(:class:`GraphBuilder`: the exporters turn that description into NIR nodes or a layer
table). Adding a family is one module with one record passed to :func:`register_family`;
nothing else names it.

Every student is feed-forward in time: each layer processes all T steps at once
(convolutions over a T*B batch, then the LIF cell stepped T times), the same arithmetic as
stepping the whole network once per timestep with far fewer kernel calls; BatchNorm
statistics in training are taken over T*B. Direct encoding: the normalised image is the
input current of the first layer at every step. The readout is non-spiking:
logits_t = W s_t + b, and the student's logits are their mean over the T steps.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, NamedTuple, Protocol

import torch
from torch import nn

from stars_deploy.errors import CheckpointError, ConfigError
from stars_deploy.fileio import fit_state_dict, load_torch, save_torch

from .neurons import LIFConfig

STUDENT_FORMAT = "stars-deploy/student-v1"
DEFAULT_FAMILY = "convnet"
# The most steps per sample a file (student.pt, .nir) may declare: far above any rate-coded
# student's T (4-64), and what keeps a corrupt or hostile file from sizing a run by itself.
MAX_TIMESTEPS = 10_000


class GraphBuilder(Protocol):
    """What a family's ``describe`` may call: one method per node kind, each returning the new
    node's name. Shapes are tracked by the builder; modules are the folded student's."""

    def conv(self, name: str, conv: nn.Conv2d, source: str) -> str: ...

    def neuron(self, name: str, lif: LIFConfig, sources: list[str]) -> str: ...

    def flatten(self, name: str, source: str) -> str: ...

    def affine(self, name: str, linear: nn.Linear, source: str) -> str: ...

    def global_avg_pool(self, name: str, source: str) -> str: ...


@dataclass(frozen=True)
class StudentFamily:
    """One student family under one name (``--student NAME``)."""

    name: str
    build: Callable[["StudentConfig"], nn.Module]
    fold: Callable[[nn.Module], None]  # in place, on a copy: merge every BatchNorm into its conv
    describe: Callable[[GraphBuilder, nn.Module, LIFConfig], tuple[str, dict[str, str]]]
    # ^ (builder, folded student, neuron config) -> (last node, {neuron node: spike name}); the
    #   builder already holds the node "input"
    default_width: int
    default_depth: int
    summary: str  # one line for --help
    validate: Callable[["StudentConfig"], None] = lambda config: None  # raises ConfigError


FAMILIES: dict[str, StudentFamily] = {}


def register_family(family: StudentFamily) -> StudentFamily:
    """Make ``family`` available under its name (to the CLI, distill, folding and export)."""
    FAMILIES[family.name] = family
    return family


def student_family(name: str) -> StudentFamily:
    if name not in FAMILIES:
        raise ConfigError(f"unknown student {name!r}; choose one of {', '.join(FAMILIES)}")
    return FAMILIES[name]


@dataclass(frozen=True)
class StudentConfig:
    """Architecture of a student; JSON-friendly and stored beside its weights. ``width`` and
    ``depth`` default to the family's."""

    family: str = DEFAULT_FAMILY
    input_shape: tuple[int, int, int] = (1, 8, 8)
    num_classes: int = 10
    width: int | None = None
    depth: int | None = None
    timesteps: int = 4
    lif: LIFConfig = field(default_factory=LIFConfig)

    def __post_init__(self):
        family = student_family(self.family)
        if self.width is None:
            object.__setattr__(self, "width", family.default_width)
        if self.depth is None:
            object.__setattr__(self, "depth", family.default_depth)
        if self.timesteps < 1:
            raise ConfigError(f"--timesteps must be at least 1, got {self.timesteps}")
        if self.width < 1:
            raise ConfigError(f"--width must be at least 1, got {self.width}")
        if self.depth < 1:
            raise ConfigError(f"--depth must be at least 1, got {self.depth}")
        family.validate(self)

    def to_dict(self) -> dict:
        return {"family": self.family, "input_shape": list(self.input_shape),
                "num_classes": self.num_classes, "width": self.width, "depth": self.depth,
                "timesteps": self.timesteps, "lif": self.lif.to_dict()}

    @classmethod
    def from_dict(cls, values: dict) -> "StudentConfig":
        values = dict(values)
        values["input_shape"] = tuple(values["input_shape"])
        values["lif"] = LIFConfig.from_dict(values["lif"])
        return cls(**values)

    def with_timesteps(self, timesteps: int) -> "StudentConfig":
        return replace(self, timesteps=timesteps)


class StudentOutput(NamedTuple):
    logits: torch.Tensor  # (B, classes): mean of logits_t over time
    logits_t: torch.Tensor  # (T, B, classes)
    features: torch.Tensor  # (B, C): last spiking stage's rate over time and space (RCA's h_S)
    spikes: dict[str, torch.Tensor]  # layer name -> (T, B, ...) spikes, in forward order


def build_student(config: StudentConfig) -> nn.Module:
    """A freshly initialised student of ``config``."""
    return student_family(config.family).build(config)


def save_student(path: Path, model: nn.Module) -> None:
    """Atomically write ``{'format', 'config', 'state_dict'}``, loadable with weights_only=True."""
    state = {key: value.detach().cpu() for key, value in model.state_dict().items()}
    save_torch(path, {"format": STUDENT_FORMAT, "config": model.config.to_dict(), "state_dict": state})


def load_student(path: Path) -> nn.Module:
    """Rebuild a student saved by :func:`save_student` (eval mode, on the CPU)."""
    payload = load_torch(path, "student checkpoint")
    if not isinstance(payload, dict) or payload.get("format") != STUDENT_FORMAT:
        raise CheckpointError(f"{path} is not a stars-deploy student (expected format {STUDENT_FORMAT})")
    model = build_student(StudentConfig.from_dict(payload["config"]))
    fit_state_dict(model, payload["state_dict"], f"student checkpoint {path}")
    return model.eval()
