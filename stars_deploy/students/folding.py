r"""BatchNorm folding: the student as it ships, with every BatchNorm merged into its convolution.

For a convolution ``W`` (bias ``c``, zero when absent) followed by BatchNorm in eval mode
(running mean ``mu``, running variance ``sigma^2``, affine ``gamma``, ``beta``, ``eps``):

.. math::
    s = \gamma / \sqrt{\sigma^2 + \epsilon}, \qquad
    W' = s \cdot W, \qquad b' = \beta + s\,(c - \mu)

computed in float64 and rounded once to float32. The folded convolution gives the same
current up to float32 rounding, not bit for bit: a neuron whose voltage lies within about
1e-7 of threshold may flip. So the student that every exported file is compared against is
the *folded* student built here (same Norse cells, same operation order); the training-form
student is compared too, and its differences are reported, not hidden.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from stars_deploy.errors import ConfigError

from .base import student_family
from .layers import SpikingConv


def fold_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Folded (weight, bias), float32, of ``conv`` followed by ``bn`` in eval mode."""
    if bn.running_mean is None or bn.running_var is None:
        raise ConfigError(f"BatchNorm {bn} has no running statistics: it cannot be folded")
    weight = conv.weight.detach().double()
    conv_bias = conv.bias.detach().double() if conv.bias is not None else torch.zeros(weight.shape[0], dtype=torch.float64)
    gamma = bn.weight.detach().double() if bn.weight is not None else torch.ones_like(conv_bias)
    beta = bn.bias.detach().double() if bn.bias is not None else torch.zeros_like(conv_bias)
    scale = gamma / torch.sqrt(bn.running_var.detach().double() + bn.eps)
    folded_weight = weight * scale.view(-1, 1, 1, 1)
    folded_bias = beta + scale * (conv_bias - bn.running_mean.detach().double())
    return folded_weight.float().contiguous(), folded_bias.float().contiguous()


def folded_conv(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """One biased convolution equal to ``bn(conv(x))`` in eval mode (float32, rounded once)."""
    weight, bias = fold_conv_bn(conv, bn)
    folded = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                       padding=conv.padding, dilation=conv.dilation, groups=conv.groups, bias=True)
    with torch.no_grad():
        folded.weight.copy_(weight)
        folded.bias.copy_(bias)
    return folded


def fold_spiking_convs(student: nn.Module) -> None:
    """Fold every :class:`SpikingConv` (conv -> BatchNorm -> LIF) of ``student`` in place: the
    part of BatchNorm folding that every family shares."""
    for module in student.modules():
        if isinstance(module, SpikingConv) and not isinstance(module.bn, nn.Identity):
            module.conv, module.bn = folded_conv(module.conv, module.bn), nn.Identity()


def fold_student(student: nn.Module) -> nn.Module:
    """A copy of ``student`` (eval mode, CPU) with every conv->BatchNorm pair folded into one
    biased convolution and the BatchNorm replaced by identity, as its family says
    (``StudentFamily.fold``). The original is not touched."""
    folded = copy.deepcopy(student).cpu().eval()
    student_family(folded.config.family).fold(folded)
    remaining = [name for name, m in folded.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if remaining:
        raise ConfigError(f"BatchNorm layers left unfolded: {', '.join(remaining)}")
    return folded
