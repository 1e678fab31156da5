"""Spiking students: Norse LIF networks run for T timesteps with direct encoding.

Both families are feed-forward in time, so each layer processes all T steps at once
(convolutions over a T*B batch, then the LIF cell stepped T times). That is the same
arithmetic as stepping the whole network once per timestep, with far fewer kernel calls;
BatchNorm statistics in training are taken over T*B.

Direct encoding: the normalised image is the input current of the first layer at every
step, so the first convolution (and its BatchNorm) is computed once and repeated T times.

Families:
- ``convnet``: strided conv-BN-LIF layers, flatten, a dense readout. No pooling, no skips:
  the shape that Loihi's netx format can run.
- ``resnet``: a spiking CIFAR-style ResNet (depth 6n+2; conv-BN-LIF-conv-BN + shortcut,
  then LIF; a 1x1 conv-BN shortcut where the shape changes), global average pool, dense.

The readout is non-spiking: logits_t = W s_t + b, and the student's logits are their mean
over the T steps.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from .errors import CheckpointError, ConfigError
from .fileio import load_torch, save_torch
from .neurons import LIFConfig, LIFSequence
from .teachers import fit_state_dict

STUDENT_FORMAT = "stars-deploy/student-v1"


@dataclass(frozen=True)
class StudentConfig:
    """Architecture of a student; JSON-friendly and stored beside its weights."""

    family: str = "convnet"
    input_shape: tuple[int, int, int] = (1, 8, 8)
    num_classes: int = 10
    width: int = 32
    depth: int = 3
    timesteps: int = 4
    lif: LIFConfig = field(default_factory=LIFConfig)

    def __post_init__(self):
        if self.family not in STUDENT_FAMILIES:
            raise ConfigError(
                f"unknown student {self.family!r}; choose one of {', '.join(STUDENT_FAMILIES)}")
        if self.timesteps < 1:
            raise ConfigError(f"--timesteps must be at least 1, got {self.timesteps}")
        if self.width < 1:
            raise ConfigError(f"--width must be at least 1, got {self.width}")
        if self.family == "resnet" and (self.depth < 8 or (self.depth - 2) % 6):
            raise ConfigError(f"--depth {self.depth} for a spiking ResNet must be 6n+2 (8, 14, 20, ...)")
        if self.family == "convnet" and self.depth < 1:
            raise ConfigError(f"--depth must be at least 1, got {self.depth}")

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


def _over_time(module: nn.Module, sequence: torch.Tensor) -> torch.Tensor:
    """Apply a per-step module to a (T, B, ...) tensor as one T*B batch."""
    steps, batch = sequence.shape[:2]
    return module(sequence.flatten(0, 1)).unflatten(0, (steps, batch))


def _repeat_over_time(current: torch.Tensor, steps: int) -> torch.Tensor:
    return current.unsqueeze(0).expand(steps, *current.shape)


class SpikingConv(nn.Module):
    """conv (no bias) -> BatchNorm -> LIF, over a (T, B, C, H, W) sequence."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, lif: LIFConfig,
                 kernel_size: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride,
                              padding=kernel_size // 2, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        self.lif = LIFSequence(lif)

    def current(self, sequence: torch.Tensor) -> torch.Tensor:
        return _over_time(lambda x: self.bn(self.conv(x)), sequence)

    def forward(self, sequence: torch.Tensor) -> torch.Tensor:
        return self.lif(self.current(sequence))

    def forward_constant(self, image: torch.Tensor, steps: int) -> torch.Tensor:
        """Direct encoding: the same input every step, so compute the current once."""
        return self.lif(_repeat_over_time(self.bn(self.conv(image)), steps))


def convnet_layout(input_shape: tuple[int, int, int], width: int, depth: int) -> list[tuple[int, int]]:
    """(channels, stride) per layer: stride 1 first, then stride 2 (doubling the width, up to
    8x) while the feature map is larger than 2x2, then stride 1."""
    side = min(input_shape[1:])
    channels, layout = width, [(width, 1)]
    for _ in range(1, depth):
        if side > 2:
            side = (side + 1) // 2
            channels = min(2 * channels, 8 * width)
            layout.append((channels, 2))
        else:
            layout.append((channels, 1))
    return layout


def _conv_out_side(side: int, stride: int) -> int:
    return (side - 1) // stride + 1


class SpikingConvNet(nn.Module):
    """Feed-forward all-convolutional spiking network (Loihi/netx-deployable)."""

    def __init__(self, config: StudentConfig):
        super().__init__()
        self.config = config
        in_channels, height, width = config.input_shape
        layers = []
        for channels, stride in convnet_layout(config.input_shape, config.width, config.depth):
            layers.append(SpikingConv(in_channels, channels, stride, config.lif))
            in_channels = channels
            height, width = _conv_out_side(height, stride), _conv_out_side(width, stride)
        self.layers = nn.ModuleList(layers)
        self.readout = nn.Linear(in_channels * height * width, config.num_classes)

    def forward(self, images: torch.Tensor) -> StudentOutput:
        steps = self.config.timesteps
        spikes = {}
        sequence = self.layers[0].forward_constant(images, steps)
        spikes["layers.0"] = sequence
        for index, layer in enumerate(self.layers[1:], start=1):
            sequence = layer(sequence)
            spikes[f"layers.{index}"] = sequence
        logits_t = self.readout(sequence.flatten(2))
        return StudentOutput(logits_t.mean(0), logits_t, sequence.mean(dim=(0, 3, 4)), spikes)


class SpikingBasicBlock(nn.Module):
    """conv-BN-LIF -> conv-BN, plus shortcut (identity, or 1x1 conv-BN on a shape change), -> LIF."""

    def __init__(self, in_planes: int, planes: int, stride: int, lif: LIFConfig):
        super().__init__()
        self.first = SpikingConv(in_planes, planes, stride, lif)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(planes))
        self.lif = LIFSequence(lif)

    def forward(self, sequence: torch.Tensor, spikes: dict, name: str) -> torch.Tensor:
        hidden = self.first(sequence)
        spikes[f"{name}.first"] = hidden
        current = _over_time(lambda x: self.bn2(self.conv2(x)), hidden)
        current = current + _over_time(self.shortcut, sequence)
        out = self.lif(current)
        spikes[f"{name}.out"] = out
        return out


class SpikingResNet(nn.Module):
    """Spiking CIFAR-style ResNet of depth 6n+2 with stage widths w, 2w, 4w."""

    def __init__(self, config: StudentConfig):
        super().__init__()
        self.config = config
        blocks_per_stage = (config.depth - 2) // 6
        width = config.width
        self.stem = SpikingConv(config.input_shape[0], width, 1, config.lif)
        blocks, in_planes = [], width
        for stage, planes in enumerate((width, 2 * width, 4 * width)):
            for index in range(blocks_per_stage):
                stride = 2 if stage > 0 and index == 0 else 1
                blocks.append(SpikingBasicBlock(in_planes, planes, stride, config.lif))
                in_planes = planes
        self.blocks = nn.ModuleList(blocks)
        self.readout = nn.Linear(in_planes, config.num_classes)

    def forward(self, images: torch.Tensor) -> StudentOutput:
        sequence = self.stem.forward_constant(images, self.config.timesteps)
        spikes = {"stem": sequence}
        for index, block in enumerate(self.blocks):
            sequence = block(sequence, spikes, f"blocks.{index}")
        pooled = sequence.mean(dim=(3, 4))  # (T, B, C): global average pool per step
        logits_t = self.readout(pooled)
        return StudentOutput(logits_t.mean(0), logits_t, pooled.mean(0), spikes)


STUDENT_FAMILIES: dict[str, type[nn.Module]] = {"convnet": SpikingConvNet, "resnet": SpikingResNet}


def build_student(config: StudentConfig) -> nn.Module:
    """A freshly initialised student of ``config``."""
    return STUDENT_FAMILIES[config.family](config)


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
