r"""The synthesis and student objectives of docs/METHOD.md (in this repository), as pure functions of tensors.

Synthesis:  L_syn = l_bn L_BN + l_ce L_CE + l_adv L_ADV + l_tv L_TV + l_l2 L_L2
                    + l_rca L_RCA + l_tar L_TAR + l_tar_student L_TAR^S
Student:    L_stu = tau^2 KL(softmax(z_A/tau) || softmax(z_S/tau)) + b_rca L_RCA(h_A detached)
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from stars_deploy.students.neurons import LIFSequence
from stars_deploy.students.rate import RateActivation, firing_current

RCA_VARIANTS = ("gram", "sp", "rkd")
# |gamma| below this would make TAR's temperature s*|gamma| vanish; such channels are all
# at beta and carry no tail information anyway.
MIN_ABS_GAMMA = 1e-3
# Feature rows with a smaller L2 norm count as silent in RCA (a spike rate is >= 1/(T*H*W)).
MIN_FEATURE_NORM = 1e-6


def bn_statistics_loss(inputs: torch.Tensor, running_mean: torch.Tensor, running_var: torch.Tensor,
                       groups: int = 1, history: tuple[torch.Tensor, torch.Tensor] | None = None,
                       momentum: float = 0.0) -> torch.Tensor:
    r"""One BatchNorm layer's term of L_BN (DeepInversion):
    :math:`\|\mu_{NHW}(x) - \mu_{run}\|_2 + \|\sigma^2_{NHW}(x) - \sigma^2_{run}\|_2`,
    with the biased batch variance. With ``groups`` G > 1 the batch is G independent batches
    of N/G samples (consecutive rows), each matched on its own, and the G terms are averaged:
    optimising G batches at once then means what optimising them one after another means.
    With a ``history`` (mean, var) of earlier batches (FastDFKD's BN momentum m), the batch
    statistics are blended before matching: :math:`\mu \leftarrow (1 - m) \mu + m \mu_{hist}`,
    likewise :math:`\sigma^2`, so a batch need only complete what earlier batches left off."""
    return statistics_distance(*batch_statistics(inputs, groups), running_mean, running_var, history, momentum)


def statistics_distance(mean: torch.Tensor, var: torch.Tensor, running_mean: torch.Tensor,
                        running_var: torch.Tensor, history: tuple[torch.Tensor, torch.Tensor] | None = None,
                        momentum: float = 0.0) -> torch.Tensor:
    """:func:`bn_statistics_loss` from batch statistics (G, C) already computed."""
    if history is not None:
        mean = (1 - momentum) * mean + momentum * history[0]
        var = (1 - momentum) * var + momentum * history[1]
    return (torch.linalg.vector_norm(mean - running_mean, dim=1)
            + torch.linalg.vector_norm(var - running_var, dim=1)).mean()


def batch_statistics(inputs: torch.Tensor, groups: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance over N, H, W of each of ``groups`` consecutive
    slices of the batch: two (G, C) tensors."""
    grouped = inputs.reshape(groups, inputs.shape[0] // groups, *inputs.shape[1:])
    dims = [1] + list(range(3, grouped.dim()))
    return grouped.mean(dim=dims), grouped.var(dim=dims, unbiased=False)


def gaussian_tail(k: float) -> float:
    r""":math:`\pi_k = 1 - \Phi(k)`, the standard normal's upper tail beyond k."""
    return 0.5 * math.erfc(k / math.sqrt(2.0))


def _thresholds(gamma: torch.Tensor, beta: torch.Tensor, k: float):
    abs_gamma = gamma.abs().clamp_min(MIN_ABS_GAMMA).view(1, -1, 1, 1)
    return beta.view(1, -1, 1, 1) + k * abs_gamma, abs_gamma


def soft_exceedance(outputs: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, k: float,
                    temperature: float) -> torch.Tensor:
    r"""Per-channel soft tail rate of a BN output u (N, C, H, W):
    :math:`e_k = \text{mean}_{NHW}\, \sigma\big((u - \theta_k) / (s |\gamma|)\big)`,
    :math:`\theta_k = \beta + k |\gamma|`."""
    theta, abs_gamma = _thresholds(gamma, beta, k)
    return torch.sigmoid((outputs - theta) / (temperature * abs_gamma)).mean(dim=(0, 2, 3))


def hard_exceedance(outputs: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, k: float) -> torch.Tensor:
    """Per-channel fraction of u above theta_k: the limit of soft_exceedance as s -> 0."""
    theta, _ = _thresholds(gamma, beta, k)
    return (outputs > theta).float().mean(dim=(0, 2, 3))


def tar_layer_loss(outputs: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor,
                   ks: tuple[float, ...], temperature: float) -> torch.Tensor:
    r"""One BN layer's term of L_TAR: :math:`\sum_k \text{mean}_C (e_k - \pi_k)^2`."""
    return sum(((soft_exceedance(outputs, gamma, beta, k, temperature) - gaussian_tail(k)) ** 2).mean()
               for k in ks)


def matching_layers(student_layers: int, teacher_layers: int) -> list[int]:
    """For each of a student's neuron layers, the teacher BatchNorm layer at the same relative
    depth: index round(l (M - 1) / (L - 1)) of M (the last one for a one-layer student)."""
    if student_layers == 1:
        return [teacher_layers - 1]
    return [round(index * (teacher_layers - 1) / (student_layers - 1)) for index in range(student_layers)]


def student_tail_loss(currents: list[torch.Tensor], firing_currents: list[float], teacher_rates: torch.Tensor,
                      temperature: float | torch.Tensor) -> torch.Tensor:
    r"""METHOD.md's "student tail" variant of L_TAR: the soft exceedance of each student neuron
    layer l, its input current c (N, C, ...) against :math:`\theta_l`, the constant current that
    brings the membrane to threshold within the T steps (students/rate.py firing_current),

    .. math:: e_{l,c} = \text{mean}_{N,\dots}\, \sigma\big((c - \theta_l) / (s\, \theta_l)\big),

    matched to the teacher's rate :math:`r_{m(l)}` (the share of its BatchNorm outputs that its
    ReLU passes, u > 0) at the same relative depth (:func:`matching_layers`):
    :math:`L = \sum_l \text{mean}_C (e_{l,c} - r_{m(l)})^2`."""
    layers = matching_layers(len(currents), len(teacher_rates))
    total = torch.zeros((), device=teacher_rates.device)
    for current, theta, layer in zip(currents, firing_currents, layers, strict=True):
        dims = [0] + list(range(2, current.dim()))
        rate = torch.sigmoid((current.float() - theta) / (temperature * theta)).mean(dim=dims)
        total = total + ((rate - teacher_rates[layer]) ** 2).mean()
    return total


class StudentProbe:
    """Forward hooks on a student's neurons -- its LIF layers, or the rate twin's activation --
    that record, while the probe is open (``with``), every call's input current as (N, C, ...)
    (a LIF's T steps folded into N) with the current that fires within T steps."""

    def __init__(self, student: nn.Module):
        self.student = student
        self.currents: list[torch.Tensor] = []
        self.firing_currents: list[float] = []
        self._handles: list = []

    def _hook(self, module: nn.Module, inputs, output) -> None:
        current = inputs[0]
        if isinstance(module, RateActivation):
            self.firing_currents.append(module.bounds[0])  # the twin's staircase starts there
        else:
            self.firing_currents.append(firing_current(current.shape[0], module.config))
            current = current.flatten(0, 1)
        self.currents.append(current)

    def __enter__(self) -> "StudentProbe":
        neurons = [module for module in self.student.modules() if isinstance(module, (LIFSequence, RateActivation))]
        self._handles = [module.register_forward_hook(self._hook) for module in neurons]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def _alive(features: torch.Tensor) -> torch.Tensor:
    """Rows with a usable norm. A silent student sample has all-zero rates: its cosine is
    undefined and the gradient of h/||h|| there is ~1/eps, which wrecks training."""
    return features.flatten(1).norm(dim=1) > MIN_FEATURE_NORM


def cosine_gram(features: torch.Tensor) -> torch.Tensor:
    """G(h) = normalise_rows(h) @ normalise_rows(h).T, B x B, whatever the feature width;
    rows of norm <= MIN_FEATURE_NORM are zero (and carry no gradient)."""
    flat = features.flatten(1)
    alive = _alive(flat).unsqueeze(1)
    unit = torch.where(alive, flat / flat.norm(dim=1, keepdim=True).clamp_min(MIN_FEATURE_NORM), 0.0)
    return unit @ unit.t()


def _pair_mask(teacher_features: torch.Tensor, student_features: torch.Tensor) -> torch.Tensor:
    alive = (_alive(teacher_features) & _alive(student_features)).float()
    return alive.unsqueeze(0) * alive.unsqueeze(1)


def _rkd_distances(features: torch.Tensor) -> torch.Tensor:
    distances = torch.cdist(features.flatten(1), features.flatten(1)).clamp_min(1e-12)
    off_diagonal = ~torch.eye(len(features), dtype=torch.bool, device=features.device)
    return distances / distances[off_diagonal].mean().clamp_min(1e-12)


def rca_loss(teacher_features: torch.Tensor, student_features: torch.Tensor,
             variant: str = "gram") -> torch.Tensor:
    r"""Relational Consistency Alignment between B x d_A and B x d_S features.

    Pairs involving a sample whose features are all (near) zero -- a silent student -- are
    left out: their relations are undefined.

    - ``gram`` (default): :math:`\|G(h_A) - G(h_S)\|_F^2 / B^2` with the cosine Gram G.
    - ``sp``: similarity-preserving KD (Tung & Mori 2019): rows of :math:`h h^T` L2-normalised.
    - ``rkd``: RKD distance term (Park et al. 2019): Huber loss between mean-normalised
      pairwise distances.
    """
    batch = teacher_features.shape[0]
    mask = _pair_mask(teacher_features, student_features)  # pairs with a silent sample drop out
    if variant == "gram":
        return (mask * (cosine_gram(teacher_features) - cosine_gram(student_features)).pow(2)).sum() / batch**2
    if variant == "sp":
        def similarity(h):
            flat = h.flatten(1) @ h.flatten(1).t()
            return flat / flat.norm(dim=1, keepdim=True).clamp_min(MIN_FEATURE_NORM**2)
        return (mask * (similarity(teacher_features) - similarity(student_features)).pow(2)).sum() / batch**2
    if variant == "rkd":
        return F.smooth_l1_loss(_rkd_distances(student_features), _rkd_distances(teacher_features))
    raise ValueError(f"unknown RCA variant {variant!r}; choose one of {', '.join(RCA_VARIANTS)}")


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    r""":math:`\tau^2\, KL(\text{softmax}(z_A/\tau) \,\|\, \text{softmax}(z_S/\tau))`, batch mean."""
    return F.kl_div(F.log_softmax(student_logits / temperature, dim=1),
                    F.log_softmax(teacher_logits / temperature, dim=1),
                    reduction="batchmean", log_target=True) * temperature**2


def adversarial_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                     temperature: float = 1.0) -> torch.Tensor:
    """FastDFKD/CMI competition term: minus the per-sample KL(teacher || student), counted only
    where both still agree on the class, so minimising it seeks samples the student gets wrong
    without leaving the teacher's class."""
    per_sample = F.kl_div(F.log_softmax(student_logits / temperature, dim=1),
                          F.log_softmax(teacher_logits / temperature, dim=1),
                          reduction="none", log_target=True).sum(dim=1)
    agree = (student_logits.argmax(1) == teacher_logits.argmax(1)).float()
    return -(per_sample * agree).mean()


def total_variation(images: torch.Tensor) -> torch.Tensor:
    """Anisotropic L1 total variation, mean over pixels: the image prior L_TV."""
    dx = (images[..., :, 1:] - images[..., :, :-1]).abs().mean()
    dy = (images[..., 1:, :] - images[..., :-1, :]).abs().mean()
    return dx + dy


class TeacherProbe:
    """Forward hooks on every BatchNorm layer of a teacher that, while ``active``, collect
    L_BN from the layer inputs and L_TAR from the layer outputs (before the nonlinearity).

    With ``bn_momentum`` m > 0 the probe also keeps, per layer, a running (mean, var) of
    the synthetic batches (FastDFKD): :meth:`end_batch` folds in the statistics of the last
    forward pass, hist <- m hist + (1 - m) stat (the first batch sets it), and L_BN matches
    the blend of each batch with that history (:func:`bn_statistics_loss`)."""

    def __init__(self, layers: list[tuple[str, nn.BatchNorm2d]], tar_ks: tuple[float, ...] = (1.0, 2.0),
                 bn_groups: int = 1, bn_momentum: float = 0.0):
        self.tar_ks = tar_ks
        self.bn_groups = bn_groups
        self.bn_momentum = bn_momentum
        self.active = False
        self.want_tar = False
        self.want_rates = False
        self.tar_temperature = 0.1
        self.bn_terms: list[torch.Tensor] = []
        self.tar_terms: list[torch.Tensor] = []
        self.rates: list[torch.Tensor] = []
        self.history: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(layers)
        self._last: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(layers)
        self._handles = [layer.register_forward_hook(functools.partial(self._hook, index))
                         for index, (_, layer) in enumerate(layers)]

    def _hook(self, index: int, module: nn.BatchNorm2d, inputs, output) -> None:
        if not self.active:
            return
        mean, var = batch_statistics(inputs[0].float(), self.bn_groups)  # once, for the loss and the history
        self.bn_terms.append(statistics_distance(mean, var, module.running_mean, module.running_var,
                                                 self.history[index], self.bn_momentum))
        if self.bn_momentum > 0:
            self._last[index] = (mean.detach().mean(0), var.detach().mean(0))
        if self.want_tar:
            self.tar_terms.append(tar_layer_loss(output.float(), module.weight, module.bias,
                                                 self.tar_ks, self.tar_temperature))
        if self.want_rates:  # the share of this layer's outputs that the ReLU after it passes
            self.rates.append((output.detach() > 0).float().mean())

    def collect(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(L_BN, L_TAR) summed over layers since the last call, and the layers' ReLU rates (M,)
        (empty unless ``want_rates``); clears them."""
        zero = torch.zeros(())
        bn = torch.stack(self.bn_terms).sum() if self.bn_terms else zero
        tar = torch.stack(self.tar_terms).sum() if self.tar_terms else zero
        rates = torch.stack(self.rates) if self.rates else torch.zeros(0)
        self.bn_terms, self.tar_terms, self.rates = [], [], []
        return bn, tar, rates

    def end_batch(self) -> None:
        """Fold the last pass's batch statistics into the history (with bn_momentum > 0)."""
        if self.bn_momentum == 0:
            return
        m = self.bn_momentum
        self.history = [last if old is None or last is None else (m * old[0] + (1 - m) * last[0],
                                                                  m * old[1] + (1 - m) * last[1])
                        for old, last in zip(self.history, self._last)]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
