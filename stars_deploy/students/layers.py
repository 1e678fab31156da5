"""Building blocks shared by the student families: per-step modules over (T, B, ...) sequences."""

from __future__ import annotations

import torch
from torch import nn

from .neurons import LIFConfig, LIFSequence


def over_time(module: nn.Module, sequence: torch.Tensor) -> torch.Tensor:
    """Apply a per-step module to a (T, B, ...) tensor as one T*B batch."""
    steps, batch = sequence.shape[:2]
    return module(sequence.flatten(0, 1)).unflatten(0, (steps, batch))


def repeat_over_time(current: torch.Tensor, steps: int) -> torch.Tensor:
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
        return over_time(lambda x: self.bn(self.conv(x)), sequence)

    def forward(self, sequence: torch.Tensor) -> torch.Tensor:
        return self.lif(self.current(sequence))

    def forward_constant(self, image: torch.Tensor, steps: int) -> torch.Tensor:
        """Direct encoding: the same input every step, so compute the current once."""
        return self.lif(repeat_over_time(self.bn(self.conv(image)), steps))
