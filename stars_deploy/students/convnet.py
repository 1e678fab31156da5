"""The ``convnet`` family: strided conv-BN-LIF layers, flatten, a dense readout.

No pooling and no skips: the shape that Loihi's netx format can run (the deployable family).
"""

from __future__ import annotations

import torch
from torch import nn

from .base import GraphBuilder, StudentConfig, StudentFamily, StudentOutput, register_family
from .folding import fold_spiking_convs
from .layers import SpikingConv
from .neurons import LIFConfig


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


def describe_convnet(builder: GraphBuilder, student: nn.Module, lif: LIFConfig) -> tuple[str, dict[str, str]]:
    source, spike_layers = "input", {}
    for index, layer in enumerate(student.layers):
        source = builder.conv(f"layers.{index}.conv", layer.conv, source)
        source = builder.neuron(f"layers.{index}.lif", lif, [source])
        spike_layers[source] = f"layers.{index}"
    source = builder.flatten("flatten", source)
    return builder.affine("readout", student.readout, source), spike_layers


def convnet_rate_forward(student: nn.Module, images: torch.Tensor, activation: nn.Module) -> StudentOutput:
    """The rate twin (rate.py): every LIF replaced by its constant-current rate, one step."""
    rates = images
    for layer in student.layers:
        rates = activation(layer.bn(layer.conv(rates)))
    logits = student.readout(rates.flatten(1))
    return StudentOutput(logits, logits.unsqueeze(0), rates.mean(dim=(2, 3)), {})


CONVNET = register_family(StudentFamily(
    name="convnet", build=SpikingConvNet, fold=fold_spiking_convs, describe=describe_convnet,
    rate_forward=convnet_rate_forward,
    default_width=32, default_depth=3,
    summary="strided conv-BN-LIF layers, flatten, dense readout (feed-forward, Loihi-deployable)"))
