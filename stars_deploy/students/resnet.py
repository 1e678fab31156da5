"""The ``resnet`` family: a spiking CIFAR-style ResNet of depth 6n+2.

conv-BN-LIF -> conv-BN + shortcut (identity, or 1x1 conv-BN where the shape changes) -> LIF,
global average pool, dense readout. Skips need merges, which netx cannot hold: NIR targets only.
"""

from __future__ import annotations

import torch
from torch import nn

from stars_deploy.errors import ConfigError

from .base import GraphBuilder, StudentConfig, StudentFamily, StudentOutput, register_family
from .folding import fold_spiking_convs, folded_conv
from .layers import SpikingConv, over_time
from .neurons import LIFConfig, LIFSequence


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
        current = over_time(lambda x: self.bn2(self.conv2(x)), hidden)
        current = current + over_time(self.shortcut, sequence)
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


def validate_resnet(config: StudentConfig) -> None:
    if config.depth < 8 or (config.depth - 2) % 6:
        raise ConfigError(f"--depth {config.depth} for a spiking ResNet must be 6n+2 (8, 14, 20, ...)")


def fold_resnet(student: nn.Module) -> None:
    fold_spiking_convs(student)
    for block in student.blocks:
        block.conv2, block.bn2 = folded_conv(block.conv2, block.bn2), nn.Identity()
        if isinstance(block.shortcut, nn.Sequential):
            block.shortcut = nn.Sequential(folded_conv(block.shortcut[0], block.shortcut[1]), nn.Identity())


def describe_resnet(builder: GraphBuilder, student: nn.Module, lif: LIFConfig) -> tuple[str, dict[str, str]]:
    source = builder.conv("stem.conv", student.stem.conv, "input")
    source = builder.neuron("stem.lif", lif, [source])
    spike_layers = {source: "stem"}
    for index, block in enumerate(student.blocks):
        name = f"blocks.{index}"
        hidden = builder.conv(f"{name}.first.conv", block.first.conv, source)
        hidden = builder.neuron(f"{name}.first.lif", lif, [hidden])
        spike_layers[hidden] = f"{name}.first"
        main = builder.conv(f"{name}.conv2", block.conv2, hidden)
        shortcut = source
        if isinstance(block.shortcut, nn.Sequential):
            shortcut = builder.conv(f"{name}.shortcut", block.shortcut[0], source)
        source = builder.neuron(f"{name}.lif", lif, [main, shortcut])
        spike_layers[source] = f"{name}.out"
    source = builder.global_avg_pool("pool", source)
    source = builder.flatten("flatten", source)
    return builder.affine("readout", student.readout, source), spike_layers


RESNET = register_family(StudentFamily(
    name="resnet", build=SpikingResNet, fold=fold_resnet, describe=describe_resnet,
    default_width=16, default_depth=8, validate=validate_resnet,
    summary="spiking CIFAR-style ResNet, depth 6n+2 (NIR targets; skips do not fit netx)"))
