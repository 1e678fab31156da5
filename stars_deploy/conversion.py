r"""Data-free ANN-to-SNN conversion of a teacher, calibrated on synthetic images only.

The baseline users know from SpikingJelly's ann2snn and Sinabs' ``from_model``, except that
those calibrate on real data and this on the images synthesis made from the teacher alone.
Every ReLU of the teacher's graph (traced with torch.fx: ``F.relu``, ``torch.relu``,
``Tensor.relu`` and ``nn.ReLU``) becomes an integrate-and-fire neuron; everything else (convolutions,
BatchNorm in eval mode, residual additions, average pooling, the linear head) is linear and runs
unchanged on every step. The input is the normalised image, constant on every step (direct
encoding). At site l, with input current :math:`c_t` (the pre-activation computed from the
previous sites' outputs at step t),

.. math:: v_t = v_{t-1} + c_t,\quad z_t = [v_t > \lambda_l],\quad v_t \leftarrow v_t - \lambda_l z_t,
          \quad \text{output}\ \lambda_l z_t,\qquad v_0 = \lambda_l / 2

(reset by subtraction, half-threshold start; ``reset="zero"`` sets :math:`v_t \leftarrow 0` after a
spike instead and ``start=0`` starts from :math:`v_0 = 0`, as NIR's ``IF`` node and Loihi do, which
loses the remainder and rounds rates down: on the CIFAR ResNet-20 it leaves the converted network at
chance, benchmarks/README.md), so the mean output over T steps is the ANN's
:math:`\mathrm{clamp}(\mathrm{ReLU}(c), 0, \lambda_l)` up to a quantisation of
:math:`\lambda_l / T` where the inputs are constant (the first site exactly). The site computes
this in the form NIR can hold (exporters/converted_nir.py), with :math:`w = v - v_0`:
:math:`w_t = w_{t-1} + (c_t + f_{t-1})`, :math:`z_t = [w_t - \lambda_l (1 - s) > 0]`,
:math:`f_t = -\lambda_l z_t` (s = ``start``; an integrator, a threshold and the reset fed back one
step later), so its spikes and the exported graph's are the same float operations.

The threshold :math:`\lambda_l` is the ``percentile`` (99.9) of the ANN's positive activations at
site l on the calibration images (robust normalisation, Rueckauer et al. 2017). A max-pooling
teacher converts too (not to NIR), but max over spikes is not max over rates: expect a loss there.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.experimental.optimization import fuse

from stars_deploy.errors import ConfigError

DEFAULT_PERCENTILE = 99.9
CALIBRATION_VALUES = 1_000_000  # activations kept per site for its percentile (torch.quantile's limit is 2**24)
RELU_FUNCTIONS = (F.relu, torch.relu)
RESETS = ("subtract", "zero")  # what a spike does to the membrane: v -= threshold, or v = 0
DEFAULT_START = 0.5  # v_0 as a fraction of the threshold (0.5 centres the rounding of the rate)


class IFSite(nn.Module):
    """One converted ReLU: the ReLU itself (``ann``), the ReLU recording a sample of its
    positive outputs (``calibrate``), or the integrate-and-fire neuron above (``snn``),
    keeping its state (``w``, the reset ``feedback``) between calls until :meth:`reset`."""

    def __init__(self, reset: str = "subtract", start: float = DEFAULT_START):
        super().__init__()
        if reset not in RESETS:
            raise ConfigError(f"conversion: reset {reset!r}: choose one of {', '.join(RESETS)}")
        if not 0 <= start < 1:
            raise ConfigError(f"conversion: the start potential must be in [0, 1) thresholds, got {start}")
        self.mode, self.reset_mode, self.start = "ann", reset, start
        self.register_buffer("threshold", torch.tensor(1.0))
        self.values: list[torch.Tensor] = []
        self.w: torch.Tensor | None = None
        self.feedback: torch.Tensor | None = None
        self.spikes: torch.Tensor | float = 0.0  # summed on the device, read once per simulation

    def fire_level(self) -> torch.Tensor:
        """The level ``w`` must exceed to spike: :math:`\\lambda (1 - s)` (float32, as exported)."""
        return self.threshold * (1 - self.start)

    def reset(self) -> None:
        self.w, self.feedback, self.spikes = None, None, 0.0

    def forward(self, current: torch.Tensor) -> torch.Tensor:
        if self.mode == "snn":
            if self.w is None:
                self.w, self.feedback = torch.zeros_like(current), torch.zeros_like(current)
            self.w = self.w + (current + self.feedback)
            spikes = torch.gt(self.w - self.fire_level(), 0.0).to(current.dtype)
            if self.reset_mode == "subtract":
                self.feedback = spikes * -self.threshold
            else:  # v = 0 after a spike, i.e. w = -s lambda
                self.w = (1 - spikes) * self.w + spikes * (-self.start * self.threshold)
            self.spikes = self.spikes + spikes.sum()
            return spikes * self.threshold
        out = F.relu(current)
        if self.mode == "calibrate":
            positive = out[out > 0]
            keep = torch.randperm(positive.numel(), device=positive.device)[:CALIBRATION_VALUES]
            self.values.append(positive[keep].float().cpu())
        return out


class ConvertedNetwork(nn.Module):
    """The teacher's traced graph, BatchNorm folded into its convolutions, with every ReLU an
    :class:`IFSite`. ``forward`` is the ANN
    (or the SNN's one step, in ``snn`` mode); :meth:`simulate` runs T steps."""

    def __init__(self, teacher: nn.Module, reset: str = "subtract", start: float = DEFAULT_START):
        super().__init__()
        try:  # every conv -> BatchNorm pair folded (eval mode): the weights the NIR graph holds
            graph = fuse(copy.deepcopy(teacher).eval(), inplace=True)
        except Exception as exc:
            raise ConfigError(f"conversion: the teacher's forward cannot be traced by torch.fx "
                              f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                              "convert a teacher without data-dependent control flow") from None
        self.sites = nn.ModuleList()
        for node in list(graph.graph.nodes):
            if not _is_relu(node, graph):
                continue
            name = f"if_site_{len(self.sites)}"
            site = IFSite(reset, start)
            self.sites.append(site)
            graph.add_submodule(name, site)
            with graph.graph.inserting_after(node):
                replacement = graph.graph.call_module(name, (node.args[0],))
            node.replace_all_uses_with(replacement)
            graph.graph.erase_node(node)
        if not self.sites:
            raise ConfigError("conversion: the teacher has no ReLU to turn into a spiking neuron")
        graph.graph.lint()
        graph.recompile()
        self.graph = graph

    def set_mode(self, mode: str) -> None:
        for site in self.sites:
            site.mode = mode

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.graph(images)

    @torch.no_grad()
    def calibrate(self, images: torch.Tensor, percentile: float = DEFAULT_PERCENTILE, batch_size: int = 256) -> list[float]:
        """Set every site's threshold to the ``percentile`` of its positive ANN activations on
        ``images`` (normalised, synthetic); the thresholds, in site order."""
        if not 0 < percentile <= 100:
            raise ConfigError(f"conversion: the percentile must be in (0, 100], got {percentile}")
        self.set_mode("calibrate")
        try:
            for start in range(0, len(images), batch_size):
                self(images[start:start + batch_size])
        finally:
            self.set_mode("ann")
        thresholds = []
        for index, site in enumerate(self.sites):
            values = torch.cat(site.values) if site.values else torch.zeros(0)
            site.values = []
            if values.numel() > CALIBRATION_VALUES:
                values = values[torch.randperm(values.numel())[:CALIBRATION_VALUES]]
            if values.numel() == 0:
                raise ConfigError(f"conversion: ReLU {index} never fired on the {len(images)} calibration images")
            site.threshold.fill_(float(torch.quantile(values, percentile / 100)))
            thresholds.append(float(site.threshold))
        return thresholds

    @torch.no_grad()
    def set_thresholds(self, thresholds: list[float]) -> None:
        """Every site's threshold, in site order (what :meth:`calibrate` returned for this teacher)."""
        values = [float(t) for t in thresholds]
        if len(values) != len(self.sites) or not all(math.isfinite(t) and t > 0 for t in values):
            raise ConfigError(f"conversion: {len(values)} thresholds for {len(self.sites)} sites; each must be a "
                              "positive finite number")
        for site, value in zip(self.sites, values):
            site.threshold.fill_(value)

    @torch.no_grad()
    def simulate(self, images: torch.Tensor, timesteps: int) -> tuple[torch.Tensor, float]:
        """(logits averaged over the ``timesteps`` steps, spikes of all sites) for one batch."""
        if timesteps < 1:
            raise ConfigError(f"conversion: timesteps must be at least 1, got {timesteps}")
        self.set_mode("snn")
        for site in self.sites:
            site.reset()
        try:
            total = sum(self(images) for _ in range(timesteps)) / timesteps
            return total, float(sum(site.spikes for site in self.sites))
        finally:
            self.set_mode("ann")
            for site in self.sites:
                site.reset()


def _is_relu(node: fx.Node, graph: fx.GraphModule) -> bool:
    if node.op == "call_function":
        return node.target in RELU_FUNCTIONS
    if node.op == "call_method":
        return node.target == "relu"
    if node.op == "call_module":
        return isinstance(graph.get_submodule(node.target), nn.ReLU)
    return False
