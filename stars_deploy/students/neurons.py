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

import warnings
from dataclasses import asdict, dataclass

import torch
from norse.torch import LIFBoxCell, LIFBoxParameters, LIFCell, LIFParameters
from torch import nn

from stars_deploy.errors import ConfigError

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


def _lif_box_forward(currents: torch.Tensor, decay: float, v_leak: float, v_th: float, v_reset: float):
    """All T steps forward: (spikes, decayed voltages), with Norse's operations in Norse's order."""
    v = torch.zeros_like(currents[0]) + v_leak
    spikes, decayed = [], []
    for step in range(currents.shape[0]):
        v_decayed = v + decay * (currents[step] + v_leak - v)
        z = torch.gt(v_decayed - v_th, 0.0).to(currents.dtype)
        v = (1 - z) * v_decayed + z * v_reset
        spikes.append(z)
        decayed.append(v_decayed)
    return torch.stack(spikes), torch.stack(decayed)


def _lif_box_backward(grad_spikes: torch.Tensor, decayed: torch.Tensor, spikes: torch.Tensor, decay: float,
                      v_th: float, v_reset: float) -> torch.Tensor:
    """All T steps backward, in reverse time (the equations in :class:`_FusedLIFBox`)."""
    grads = [None] * grad_spikes.shape[0]
    grad_v = torch.zeros_like(grad_spikes[0])
    for step in range(grad_spikes.shape[0] - 1, -1, -1):
        v_decayed = decayed[step]
        surrogate = 1.0 / ((v_decayed - v_th).abs() + 1.0).pow(2)
        grad_decayed = (grad_spikes[step] - grad_v * (v_decayed - v_reset)) * surrogate + grad_v * (1.0 - spikes[step])
        grads[step] = decay * grad_decayed
        grad_v = (1.0 - decay) * grad_decayed
    return torch.stack(grads)


LIF_KERNELS = ("norse", "fused", "compiled", "auto")
_COMPILED: dict[str, object] = {}


def _kernels(compiled: bool):
    """(forward, backward): the eager functions, or torch.compile'd ones (one fused kernel for
    all T steps; compiled once per process, dynamic shapes)."""
    if not compiled:
        return _lif_box_forward, _lif_box_backward
    if not _COMPILED:
        _COMPILED["forward"] = torch.compile(_lif_box_forward, dynamic=True)
        _COMPILED["backward"] = torch.compile(_lif_box_backward, dynamic=True)
    return _COMPILED["forward"], _COMPILED["backward"]


class _FusedLIFBox(torch.autograd.Function):
    r"""All T steps of the current-free LIF (Norse's ``lif_box_feed_forward_step`` with the
    SuperSpike surrogate and reset to a value) as one autograd node.

    Forward, per step, with the same float operations in the same order as Norse:
    :math:`\tilde v_t = v_{t-1} + \frac{dt}{\tau}(x_t + v_{leak} - v_{t-1})`,
    :math:`z_t = [\tilde v_t - v_{th} > 0]`,
    :math:`v_t = (1 - z_t)\tilde v_t + z_t v_{reset}`.
    Backward, in reverse time, with :math:`s_t = 1/(|\tilde v_t - v_{th}| + 1)^2` (Norse's
    SuperSpike, which ignores alpha) and :math:`g_v` the gradient arriving at :math:`v_t`:
    :math:`g_{\tilde v} = (g_z - g_v(\tilde v_t - v_{reset})) s_t + g_v (1 - z_t)`,
    :math:`g_{x_t} = k\, g_{\tilde v}`, :math:`g_{v_{t-1}} = (1 - k) g_{\tilde v}` with k = dt/tau.
    Eager, it saves autograd's per-operation bookkeeping; compiled, the T steps become one
    fused kernel each way.
    """

    @staticmethod
    def forward(ctx, currents, decay, v_leak, v_th, v_reset, compiled):
        compiled = compiled and not _COMPILED.get("failed")
        forward, _ = _kernels(compiled)
        try:
            spikes, decayed = forward(currents, decay, v_leak, v_th, v_reset)
        except Exception as exc:  # no working compiler here: the eager kernels give the same spikes
            if not compiled:
                raise
            _COMPILED["failed"] = True
            warnings.warn(f"torch.compile of the LIF kernels failed ({type(exc).__name__}); using the eager "
                          "fused kernels", RuntimeWarning)
            compiled = False
            spikes, decayed = _lif_box_forward(currents, decay, v_leak, v_th, v_reset)
        ctx.save_for_backward(decayed, spikes)
        ctx.constants = (decay, v_th, v_reset, compiled)
        return spikes

    @staticmethod
    def backward(ctx, grad_spikes):
        decayed, spikes = ctx.saved_tensors
        decay, v_th, v_reset, compiled = ctx.constants
        _, backward = _kernels(compiled)
        return backward(grad_spikes.contiguous(), decayed, spikes, decay, v_th, v_reset), None, None, None, None, None


class LIFSequence(nn.Module):
    """Runs a Norse LIF cell over a (T, B, ...) input current and returns (T, B, ...) spikes.

    The state starts at rest (v = 0, i = 0) on every call: one call is one sample's T steps.
    ``kernel`` (see :func:`set_lif_kernel`): ``norse`` steps Norse's cell (the reference);
    ``fused`` and ``compiled`` run the current-free LIF with the SuperSpike surrogate as one
    autograd node (:class:`_FusedLIFBox`), eager or torch.compile'd, with Norse's spikes
    (tested). Other neurons always take the Norse path.
    """

    def __init__(self, config: LIFConfig):
        super().__init__()
        self.config = config
        self.cell = config.make_cell()
        self.fusable = config.tau_syn_steps is None and config.surrogate == "super"
        self.kernel = "norse"

    def forward(self, currents: torch.Tensor) -> torch.Tensor:
        if self.kernel != "norse" and self.fusable:
            p = self.cell.p  # Norse keeps its parameters as 0-dim CPU tensors
            decay = float((self.cell.dt * p.tau_mem_inv).to(currents.dtype))  # Norse's float32 product
            return _FusedLIFBox.apply(currents.contiguous(), decay, float(p.v_leak), float(p.v_th),
                                      float(p.v_reset), self.kernel == "compiled")
        state, spikes = None, []
        for current in currents:
            z, state = self.cell(current, state)
            spikes.append(z)
        return torch.stack(spikes)


def resolve_lif_kernel(kernel: str, device: torch.device) -> str:
    """``auto``: compiled on CUDA (one kernel per layer and direction instead of ~20 per step),
    Norse on the CPU. Measured on the CPU (one LIF layer, T = 4, forward + backward): compiled
    2.6x (4x64x8x8x8) to 5x (4x256x32x16x16) faster than Norse, eager fused 0.8-1.2x; but
    compiling costs ~12 s per process, more than it saves in the 90 s digits default."""
    if kernel not in LIF_KERNELS:
        raise ConfigError(f"--lif-kernel {kernel!r}: choose one of {', '.join(LIF_KERNELS)}")
    if kernel == "auto":
        return "compiled" if torch.device(device).type == "cuda" else "norse"
    return kernel


def set_lif_kernel(model: nn.Module, kernel: str) -> int:
    """Switch every LIFSequence in ``model`` to ``kernel`` (norse, fused, compiled); returns how
    many layers can take a non-Norse kernel."""
    if kernel not in LIF_KERNELS[:-1]:
        raise ConfigError(f"LIF kernel {kernel!r}: choose one of {', '.join(LIF_KERNELS[:-1])}")
    layers = [m for m in model.modules() if isinstance(m, LIFSequence)]
    for layer in layers:
        layer.kernel = kernel
    return sum(layer.fusable for layer in layers)
