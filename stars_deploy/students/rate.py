r"""The rate twin of a spiking student: the same parameters, each LIF replaced by its exact
spike rate under a constant current, so the student can be trained as a cheap ANN first.

For a current c held constant over the T steps, the student's LIF (students/neurons.py, with
v_leak = 0 and a reset to 0)

.. math:: v_t = v_{t-1} + a (c - v_{t-1}),\quad z_t = [v_t > v_{th}],\quad v_t \leftarrow (1 - z_t) v_t,
          \qquad a = dt / \tau_{mem}

emits :math:`n(c) \in \{0, \dots, T\}` spikes: a staircase in c, found here exactly, with the
student's float32 arithmetic (:func:`rate_table`). The twin computes ``n(c) / T`` in place of
every LIF, on one step instead of T, with a straight-through gradient of the ramp
``clamp((c - c_lo) / (c_sat - c_lo), 0, 1)`` (c_sat: the current that fires at every step).
Its first layer *is* the spiking student's first layer (whose input is constant: direct
encoding); deeper layers see rates where the student sees spike trains, which is the only
difference between the twin and the student. Because the twin is a different forward pass
over the student's own modules, training the twin trains the student: no weights are copied
and nothing is calibrated.

Measured (benchmarks/README.md, CIFAR-10 ResNet-20 teacher, 1 CPU core): per KD image the
twin costs 8-10x less than the spiking student, and the same pool and KD time gave 27.9 %
through the twin against 11.3 % training the spiking student directly.
"""

from __future__ import annotations

import torch
from torch import nn

from stars_deploy.errors import ConfigError

from .neurons import LIFConfig

RATE_GRID = 20_001  # points of the first scan of the staircase (then each step is bisected)
BISECTIONS = 60


def lif_count(current: torch.Tensor, steps: int, lif: LIFConfig) -> torch.Tensor:
    """Spikes of the student's LIF over ``steps`` for a current constant in time (float32,
    Norse's operation order: v + a ((v_leak - v) + c))."""
    cell = lif.make_cell()
    decay = (cell.dt * cell.p.tau_mem_inv).to(torch.float32)  # Norse's float32 dt / tau, bit for bit
    v = torch.zeros_like(current)
    count = torch.zeros_like(current)
    for _ in range(steps):
        v = v + decay * ((lif.v_leak - v) + current)
        z = (v - lif.v_threshold > 0).to(current.dtype)
        v = (1 - z) * v + z * lif.v_reset
        count = count + z
    return count


def firing_current(steps: int, lif: LIFConfig) -> float:
    r"""The constant current that brings a current-free LIF, at rest (v = 0), exactly to its
    threshold on step ``steps``: the membrane then is :math:`v_t = (v_{leak} + c)(1 - (1 - a)^t)`,
    so it fires within T steps iff :math:`c > v_{th} / (1 - (1 - a)^T) - v_{leak}`. The rate twin's
    first step of the staircase (rate_table) is this current in float32 arithmetic."""
    if lif.tau_syn_steps is not None:
        raise ConfigError("the firing current is defined for current-free LIF neurons (no --tau-syn-steps)")
    reached = 1.0 - (1.0 - lif.dt_s / lif.tau_mem_s) ** steps
    return lif.v_threshold / reached - lif.v_leak


def check_rate_twin(lif: LIFConfig) -> None:
    if lif.tau_syn_steps is not None or lif.v_reset != 0 or lif.v_leak != 0:
        raise ConfigError("the rate twin is defined for current-free LIF neurons that reset to 0 with "
                          "v_leak 0 (the Loihi-deployable student): use --strategy direct for other neurons")


def rate_table(steps: int, lif: LIFConfig) -> tuple[list[float], list[float], float]:
    """(bounds, rises, c_sat): the rate is ``sum(rise for bound < c)``, exactly the spike count /
    T for every float32 current; c_sat is where it reaches 1."""
    check_rate_twin(lif)
    c_sat = lif.v_threshold * lif.tau_mem_s / lif.dt_s * 1.001 + 1e-6
    grid = torch.linspace(0.0, c_sat, RATE_GRID, dtype=torch.float32)
    counts = lif_count(grid, steps, lif)
    bounds, rises = [], []
    for index in (counts[1:] != counts[:-1]).nonzero().squeeze(1).tolist():
        low, high = float(grid[index]), float(grid[index + 1])
        below = float(counts[index])
        for _ in range(BISECTIONS):  # the largest float32 current that still gives `below` spikes
            middle = float(torch.tensor((low + high) / 2, dtype=torch.float32))
            if middle in (low, high):
                break
            if float(lif_count(torch.tensor([middle]), steps, lif)) == below:
                low = middle
            else:
                high = middle
        bounds.append(low)
        rises.append((float(counts[index + 1]) - below) / steps)
    if abs(sum(rises) - 1.0) > 1e-6:
        raise ConfigError(f"the LIF's spike count is not a staircase from 0 to {steps} in the current")
    return bounds, rises, bounds[-1]


class _RateSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, current, bounds, rises, c_low, c_sat):
        rate = torch.zeros_like(current)
        for bound, rise in zip(bounds, rises):  # strict >, as the LIF's spike condition
            rate = rate + (current > bound).to(current.dtype) * rise
        ctx.save_for_backward((current > c_low) & (current < c_sat))
        ctx.slope = 1.0 / (c_sat - c_low)
        return rate

    @staticmethod
    def backward(ctx, grad):
        (inside,) = ctx.saved_tensors
        return grad * inside.to(grad.dtype) * ctx.slope, None, None, None, None


class RateActivation(nn.Module):
    """``n(c) / T`` of the student's LIF, with the ramp's straight-through gradient."""

    def __init__(self, steps: int, lif: LIFConfig):
        super().__init__()
        self.bounds, self.rises, self.c_sat = rate_table(steps, lif)
        # the ramp starts where the line through the first two steps of the staircase crosses 0
        self.c_low = max(0.0, 2 * self.bounds[0] - self.bounds[1]) if len(self.bounds) > 1 else 0.0

    def forward(self, current: torch.Tensor) -> torch.Tensor:
        return _RateSTE.apply(current, self.bounds, self.rises, self.c_low, self.c_sat)


class RateTwin(nn.Module):
    """The rate twin of ``student``: its family's ``rate_forward`` with the student's own
    modules. ``parameters()`` are the student's, so optimising the twin trains the student."""

    def __init__(self, student: nn.Module, rate_forward):
        super().__init__()
        self.student = student
        self.activation = RateActivation(student.config.timesteps, student.config.lif)
        self._rate_forward = rate_forward

    def forward(self, images: torch.Tensor):
        return self._rate_forward(self.student, images, self.activation)
