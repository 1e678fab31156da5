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

import hashlib
import json
import math
import re
import warnings
from dataclasses import dataclass, field, fields, replace
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
    rate_forward: Callable[[nn.Module, torch.Tensor, nn.Module], "StudentOutput"] | None = None
    # ^ (student, images, rate activation) -> the rate twin's output (rate.py), or None: no twin


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


def student_sha256(config: dict, state: dict[str, torch.Tensor]) -> str:
    """The checksum a student file carries: sha256 over the config as sorted-key JSON, then for
    every tensor in key order ``NUL key NUL dtype NUL shape NUL`` and its bytes in C order."""
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    for key in sorted(state):
        tensor = state[key].detach().cpu().contiguous()
        digest.update(f"\0{key}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def save_student(path: Path, model: nn.Module) -> None:
    """Atomically write ``{'format', 'config', 'state_dict', 'sha256'}``, loadable with
    weights_only=True; the checksum (:func:`student_sha256`) lets the reader refuse a file whose
    weights or config changed after it was written."""
    state = {key: value.detach().cpu() for key, value in model.state_dict().items()}
    config = model.config.to_dict()
    save_torch(path, {"format": STUDENT_FORMAT, "config": config, "state_dict": state,
                      "sha256": student_sha256(config, state)})


CONFIG_INTEGERS = ("num_classes", "width", "depth", "timesteps")
SHA256_HEX = re.compile(r"[0-9a-f]{64}")
STUDENT_KEYS = ("format", "config", "state_dict", "sha256")


def _number(value, integer: bool = False) -> bool:
    kinds = (int,) if integer else (int, float)
    return isinstance(value, kinds) and not isinstance(value, bool) and (integer or math.isfinite(value))


def _check_config(values, source: str) -> StudentConfig:
    """The ``config`` of a student file checked key by key (types, finiteness, ranges), then built."""
    expected = {f.name for f in fields(StudentConfig)}
    if not isinstance(values, dict) or set(values) != expected:
        keys = sorted(values) if isinstance(values, dict) else type(values).__name__
        raise CheckpointError(f"{source}: config must have the keys {', '.join(sorted(expected))}; it has {keys}")
    if not isinstance(values["family"], str):
        raise CheckpointError(f"{source}: config.family must be a student family's name, got {values['family']!r}")
    shape = values["input_shape"]
    if not isinstance(shape, (list, tuple)) or len(shape) != 3 or not all(_number(s, True) and s >= 1 for s in shape):
        raise CheckpointError(f"{source}: config.input_shape must be 3 integers >= 1 (C, H, W), got {shape!r}")
    for key in CONFIG_INTEGERS:
        if not _number(values[key], True) or values[key] < 1:
            raise CheckpointError(f"{source}: config.{key} must be an integer >= 1, got {values[key]!r}")
    if values["timesteps"] > MAX_TIMESTEPS:
        raise CheckpointError(f"{source}: config.timesteps = {values['timesteps']}, more than {MAX_TIMESTEPS}")
    lif, lif_fields = values["lif"], {f.name: f for f in fields(LIFConfig)}
    if not isinstance(lif, dict) or set(lif) != set(lif_fields):
        keys = sorted(lif) if isinstance(lif, dict) else type(lif).__name__
        raise CheckpointError(f"{source}: config.lif must have the keys {', '.join(sorted(lif_fields))}; it has {keys}")
    for key, value in lif.items():
        if key == "surrogate":
            if not isinstance(value, str):
                raise CheckpointError(f"{source}: config.lif.surrogate must be a name, got {value!r}")
        elif not (_number(value) or (key == "tau_syn_steps" and value is None)):
            raise CheckpointError(f"{source}: config.lif.{key} must be a finite number, got {value!r}")
    try:
        return StudentConfig.from_dict(values)
    except ConfigError as exc:  # the family's own rules (resnet depth 6n+2, thresholds above resets ...)
        raise CheckpointError(f"{source}: config does not describe a student: {exc}") from None


def _check_weights(state: dict, expected: dict[str, torch.Tensor], source: str) -> None:
    """Every tensor dense, of the dtype the student has, finite; BatchNorm variances >= 0."""
    for key, tensor in state.items():
        want = expected.get(key, expected.get(key.removeprefix("module.")))
        if tensor.layout != torch.strided or (want is not None and tensor.dtype != want.dtype):
            raise CheckpointError(f"{source}: {key} is a {tensor.layout} {tensor.dtype} tensor, the student has "
                                  f"{want.dtype if want is not None else 'no such'} weights: re-save it with save_student")
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise CheckpointError(f"{source}: {key} holds {bad:,} NaN or infinite value(s); this student cannot "
                                  "be simulated or exported: distil it again or use an earlier checkpoint")
        if key.endswith("running_var") and tensor.is_floating_point() and bool((tensor < 0).any()):
            raise CheckpointError(f"{source}: {key} has negative BatchNorm variances; the file is corrupt")


def _check_sha256(payload: dict, state: dict, source: str) -> None:
    stored = payload["sha256"]
    try:
        computed = student_sha256(payload["config"], state)
    except (TypeError, ValueError):
        raise CheckpointError(f"{source}: config is not plain JSON data; the file is corrupt") from None
    if not isinstance(stored, str) or not SHA256_HEX.fullmatch(stored) or computed != stored:
        raise CheckpointError(f"{source}: checksum mismatch: its config and weights hash to sha256 "
                              f"{computed[:12]}..., the file says {str(stored)[:12]}...; it was modified or "
                              "corrupted after it was saved: distil again, or resume from the run's checkpoint")


def load_student(path: Path) -> nn.Module:
    """Rebuild a student saved by :func:`save_student` (eval mode, on the CPU), validated first:
    the format, every config key's type and range, then the weights against the architecture
    the config describes, built on torch's meta device (no memory) so that a file cannot make
    us allocate more than it holds; every tensor finite and of the student's dtype. A file that
    carries ``sha256`` (every one :func:`save_student` writes) must hash to it."""
    payload = load_torch(path, "student checkpoint")
    source = f"student checkpoint {path}"
    if not isinstance(payload, dict) or payload.get("format") != STUDENT_FORMAT:
        raise CheckpointError(f"{path} is not a stars-deploy student (expected format {STUDENT_FORMAT})")
    if "config" not in payload or "state_dict" not in payload:
        raise CheckpointError(f"{source} lacks {'config' if 'config' not in payload else 'state_dict'}: "
                              "the file is incomplete; save the student again")
    unknown = sorted(set(payload) - set(STUDENT_KEYS), key=str)
    if unknown:  # e.g. 'sha256' renamed by a bit flip: refused rather than read as a file without one
        raise CheckpointError(f"{source} has key {unknown[0]!r}, which student files do not have: the file is "
                              "corrupt or was edited")
    state = payload["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise CheckpointError(f"{source} holds no state_dict of tensors")
    if "sha256" in payload:  # files saved before students carried checksums are validated only
        _check_sha256(payload, state, source)
    config = _check_config(payload["config"], source)
    if config.depth > len(state):  # every layer has weights: a deeper config is not this file's
        raise CheckpointError(f"{source}: config.depth = {config.depth} but the file holds {len(state)} tensors")
    with torch.device("meta"):
        skeleton = build_student(config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # copying into meta tensors is a no-op, as intended
        fit_state_dict(skeleton, state, source)  # missing, unexpected, mis-shaped keys: before allocating
    _check_weights(state, skeleton.state_dict(), source)
    model = build_student(config)
    fit_state_dict(model, state, source)
    return model.eval()
