r"""LIF neuron parameters and the one place where time units are converted.

Norse integrates, per step of ``dt_s`` seconds (explicit Euler),

.. math::
    i_t &= i_{t-1} + x_t \quad\text{(CUBA only; otherwise } i_t = x_t\text{)} \\
    v_t &= v_{t-1} + \frac{dt}{\tau_{mem}} \left(v_{leak} - v_{t-1} + i_t\right) \\
    z_t &= \Theta(v_t - v_{th}) \quad (\text{strict } >) \\
    v_t &\leftarrow (1 - z_t)\, v_t + z_t\, v_{reset} \\
    i_t &\leftarrow i_t \left(1 - \frac{dt}{\tau_{syn}}\right)

Time constants are given here in steps (``tau_mem_steps``) and exported in seconds
(``tau_mem_s = tau_mem_steps * dt_s``); Norse takes their inverses in 1/s.
With the defaults (tau_mem = 2 steps, no synaptic current) ``v_t = v_{t-1}/2 + x_t/2``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from norse.torch import LIFBoxCell, LIFBoxParameters, LIFCell, LIFParameters
from torch import nn

from .errors import ConfigError

DEFAULT_DT_S = 1e-3
SURROGATES = ("super", "triangle", "tanh", "circ", "heavi_erfc")


@dataclass(frozen=True)
class LIFConfig:
    """Neuron parameters shared by every spiking layer of a student."""

    tau_mem_steps: float = 2.0
    tau_syn_steps: float | None = None  # None: current-free LIF; else CUBA LIF
    v_threshold: float = 1.0
    v_reset: float = 0.0
    v_leak: float = 0.0
    dt_s: float = DEFAULT_DT_S
    surrogate: str = "super"
    surrogate_alpha: float = 10.0

    def __post_init__(self):
        if self.tau_mem_steps < 1:
            raise ConfigError(f"tau_mem_steps must be >= 1 (Euler is unstable below), got {self.tau_mem_steps}")
        if self.tau_syn_steps is not None and self.tau_syn_steps < 1:
            raise ConfigError(f"tau_syn_steps must be >= 1 or None, got {self.tau_syn_steps}")
        if self.v_threshold <= self.v_reset:
            raise ConfigError("v_threshold must be above v_reset")
        if self.surrogate not in SURROGATES:
            raise ConfigError(f"unknown surrogate {self.surrogate!r}; choose one of {', '.join(SURROGATES)}")
        if self.dt_s <= 0:
            raise ConfigError(f"dt_s must be positive, got {self.dt_s}")

    @property
    def tau_mem_s(self) -> float:
        return self.tau_mem_steps * self.dt_s

    @property
    def tau_syn_s(self) -> float | None:
        return None if self.tau_syn_steps is None else self.tau_syn_steps * self.dt_s

    def make_cell(self) -> nn.Module:
        """A Norse cell taking one step per call: ``z, state = cell(x_t, state)``."""
        common = dict(
            tau_mem_inv=torch.as_tensor(1.0 / self.tau_mem_s),
            v_leak=torch.as_tensor(self.v_leak),
            v_th=torch.as_tensor(self.v_threshold),
            v_reset=torch.as_tensor(self.v_reset),
            method=self.surrogate,
            alpha=torch.as_tensor(self.surrogate_alpha),
        )
        if self.tau_syn_steps is None:
            return LIFBoxCell(LIFBoxParameters(**common), dt=self.dt_s)
        return LIFCell(LIFParameters(tau_syn_inv=torch.as_tensor(1.0 / self.tau_syn_s), **common), dt=self.dt_s)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "LIFConfig":
        return cls(**values)


class LIFSequence(nn.Module):
    """Runs a Norse LIF cell over a (T, B, ...) input current and returns (T, B, ...) spikes.

    The state starts at rest (v = 0, i = 0) on every call: one call is one sample's T steps.
    """

    def __init__(self, config: LIFConfig):
        super().__init__()
        self.cell = config.make_cell()

    def forward(self, currents: torch.Tensor) -> torch.Tensor:
        state, spikes = None, []
        for current in currents:
            z, state = self.cell(current, state)
            spikes.append(z)
        return torch.stack(spikes)
