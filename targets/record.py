"""The one result record that every target returns, and the metrics computed from it once.

A record holds, for a batch of B samples run for T steps:
  logits_t       (T, B, K) float: the output node's value at every step
  spikes         layer name -> (T, B, ...) spikes (0/1), in forward order; names are the
                 student's spike names (``layers.0``, ``blocks.1.out``) when the file says so
  synops         layer name -> synaptic events over the batch and all steps
                 (spikes times the fan-out of the following layer(s))
  timings_s      wall-clock seconds per phase
  latency_steps  steps from the first input to the decision (T, plus any pipeline delay)
  pipeline_delay_steps  steps an input needs to reach the output (0 for a float simulator)
  neuron_updates neuron state updates over the batch (neurons x steps they are stepped)
  input_clipped  input values that did not fit the target's input format (0 for float targets)

  energy         the target's energy model (energy.py) that prices these counts, or None
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

MODEL = object()  # summarize's default energy model: the one the result carries


@dataclass
class TargetResult:
    target: str
    logits_t: torch.Tensor
    spikes: dict[str, torch.Tensor]
    synops: dict[str, float]
    timings_s: dict[str, float] = field(default_factory=dict)
    latency_steps: int = 0
    pipeline_delay_steps: int = 0
    neuron_updates: float = 0.0
    input_clipped: int = 0
    energy: Callable[[dict, float | None], dict] | None = None  # the target's energy model (energy.py), if any

    @property
    def logits(self) -> torch.Tensor:
        """(B, K): the mean of the output over the T steps."""
        return self.logits_t.mean(0)

    @property
    def predictions(self) -> torch.Tensor:
        return self.logits.argmax(1)

    @property
    def samples(self) -> int:
        return int(self.logits_t.shape[1])

    def spike_counts(self) -> dict[str, int]:
        """Spikes per layer, summed over the batch and the steps."""
        return {name: int(spikes.sum().item()) for name, spikes in self.spikes.items()}

    def firing_rates(self) -> dict[str, float]:
        """Per layer: the mean firing rate, spikes per neuron per step over the batch."""
        return {name: float(spikes.float().mean()) for name, spikes in self.spikes.items()}

    def accuracy_by_step(self, labels: torch.Tensor) -> list[float]:
        return accuracy_by_step(self.logits_t, labels)

    def stable_decision_steps(self) -> torch.Tensor:
        return stable_decision_steps(self.logits_t)

    def cpu(self) -> "TargetResult":
        return TargetResult(self.target, self.logits_t.cpu(), {k: v.cpu() for k, v in self.spikes.items()},
                            dict(self.synops), dict(self.timings_s), self.latency_steps,
                            self.pipeline_delay_steps, self.neuron_updates, self.input_clipped, self.energy)


def spike_mismatches(result: TargetResult, reference: TargetResult) -> dict[str, int]:
    """Per layer: spikes that differ between two records, summed over steps and samples.

    A layer missing from either record, or shaped differently, raises ValueError naming it."""
    mismatches = {}
    for name, spikes in reference.spikes.items():
        if name not in result.spikes:
            raise ValueError(f"layer {name!r} of {reference.target} is missing from {result.target}")
        other = result.spikes[name]
        if other.shape != spikes.shape:
            raise ValueError(f"layer {name!r}: {result.target} spikes {tuple(other.shape)} != "
                             f"{reference.target} {tuple(spikes.shape)}")
        mismatches[name] = int((other.cpu() != spikes.cpu()).sum().item())
    return mismatches


@dataclass
class Tally:
    """What the metrics need of one or more records, reduced over their samples: the logits
    over time (T, N, K) and per-layer sums, never every spike, so a simulation of 10,000
    CIFAR images holds megabytes instead of tens of gigabytes. Tallies of consecutive batches
    add up (``+``); ``reference`` is the tally of what the result was compared with, and
    ``mismatches`` the spikes that differed from it, per layer."""

    target: str
    logits_t: torch.Tensor
    spikes_by_step: dict[str, torch.Tensor]  # layer -> (T,) spikes per step over samples and neurons, float64
    neurons: dict[str, int]  # layer -> neurons per sample
    first_spike: dict[str, tuple[float, int]]  # layer -> (sum of first-spike steps, samples that spiked)
    synops: dict[str, float]
    timings_s: dict[str, float]
    latency_steps: int
    pipeline_delay_steps: int
    neuron_updates: float
    input_clipped: int
    energy: Callable | None = None
    mismatches: dict[str, int] | None = None
    reference: "Tally | None" = None

    @classmethod
    def of(cls, result: TargetResult, reference: TargetResult | None = None) -> "Tally":
        pipelined = result.pipeline_delay_steps > 0
        first = {}
        for position, (name, spikes) in enumerate(result.spikes.items()):
            fired = spikes.flatten(2).sum(2) > 0  # (T, B)
            spiked = fired.any(0)
            steps = fired.float().argmax(0) + 1 + (position if pipelined else 0)
            first[name] = (float(steps[spiked].double().sum()), int(spiked.sum()))
        return cls(result.target, result.logits_t.cpu(),
                   {name: s.flatten(2).double().sum((1, 2)).cpu() for name, s in result.spikes.items()},
                   {name: int(s[0, 0].numel()) for name, s in result.spikes.items()}, first, dict(result.synops),
                   dict(result.timings_s), result.latency_steps, result.pipeline_delay_steps,
                   float(result.neuron_updates), int(result.input_clipped), result.energy,
                   spike_mismatches(result, reference) if reference is not None else None,
                   cls.of(reference) if reference is not None else None)

    def __add__(self, other: "Tally") -> "Tally":
        def both(a, b, add):
            return None if a is None else add(a, b)
        return Tally(self.target, torch.cat([self.logits_t, other.logits_t], 1),
                     {k: v + other.spikes_by_step[k] for k, v in self.spikes_by_step.items()}, self.neurons,
                     {k: (v[0] + other.first_spike[k][0], v[1] + other.first_spike[k][1])
                      for k, v in self.first_spike.items()},
                     {k: v + other.synops.get(k, 0.0) for k, v in self.synops.items()},
                     {k: v + other.timings_s.get(k, 0.0) for k, v in self.timings_s.items()},
                     self.latency_steps, self.pipeline_delay_steps, self.neuron_updates + other.neuron_updates,
                     self.input_clipped + other.input_clipped, self.energy,
                     both(self.mismatches, other.mismatches, lambda a, b: {k: v + b[k] for k, v in a.items()}),
                     both(self.reference, other.reference, lambda a, b: a + b))

    @property
    def samples(self) -> int:
        return int(self.logits_t.shape[1])

    @property
    def predictions(self) -> torch.Tensor:
        return self.logits_t.mean(0).argmax(1)

    def spike_counts(self) -> dict[str, float]:
        return {name: float(steps.sum()) for name, steps in self.spikes_by_step.items()}

    def firing_rates(self) -> dict[str, float]:
        steps = int(self.logits_t.shape[0])
        return {name: float(counts.sum()) / (self.neurons[name] * steps * self.samples)
                for name, counts in self.spikes_by_step.items()}

    def accuracy_by_step(self, labels: torch.Tensor) -> list[float]:
        return accuracy_by_step(self.logits_t, labels)


def accuracy_by_step(logits_t: torch.Tensor, labels: torch.Tensor) -> list[float]:
    """Accuracy of the running-mean decision after 1, 2, ..., T steps: what the target scores
    when run for fewer steps (the input is constant, so a shorter run is a prefix)."""
    running = logits_t.cumsum(0).argmax(2).cpu()  # (T, B)
    return [float(v) for v in (running == labels.view(1, -1)).float().mean(1)]


def stable_decision_steps(logits_t: torch.Tensor) -> torch.Tensor:
    """(B,) first step (1-based) from which the running-mean prediction never changes."""
    running = logits_t.cumsum(0).argmax(2)  # (T, B); argmax of the sum == of the mean
    differs = (running != running[-1]).flip(0).int().cumsum(0).flip(0) > 0  # a later change exists
    return differs.sum(0) + 1


def summarize(result: TargetResult | Tally, labels: torch.Tensor | None = None,
              reference: TargetResult | None = None, energy=MODEL, loihi2_pj_per_op: float | None = None) -> dict:
    """The metrics every target reports: accuracy, agreement and spike mismatches against the
    reference, spikes, synaptic ops and neuron updates per sample, latency, and the energy per
    sample from ``energy`` (by default the model the result carries, energy.py; None: no
    estimate). ``result`` is a record (compared with ``reference``) or a :class:`Tally` of
    many (which carries its reference)."""
    tally = result if isinstance(result, Tally) else Tally.of(result, reference)
    samples = tally.samples
    predictions = tally.predictions
    spike_counts = tally.spike_counts()
    summary = {
        "target": tally.target, "samples": samples,
        "accuracy": float((predictions == labels).float().mean()) if labels is not None else None,
        "spikes_per_sample": sum(spike_counts.values()) / samples,
        "spikes_per_layer": {k: v / samples for k, v in spike_counts.items()},
        "synops_per_sample": sum(tally.synops.values()) / samples,
        "synops_per_layer": {k: v / samples for k, v in tally.synops.items()},
        "latency_steps": tally.latency_steps,
        "pipeline_delay_steps": tally.pipeline_delay_steps,
        "stable_decision_step_mean": float(stable_decision_steps(tally.logits_t).float().mean()),
        "timesteps": int(tally.logits_t.shape[0]),
        "timings_s": tally.timings_s,
        "neuron_updates_per_sample": tally.neuron_updates / samples,
        "input_clipped": tally.input_clipped,
        "firing_rate_per_layer": tally.firing_rates(),
        "accuracy_by_step": tally.accuracy_by_step(labels) if labels is not None else None,
    }
    if energy is MODEL:
        energy = tally.energy
    summary["energy_per_sample"] = energy(summary, loihi2_pj_per_op) if energy is not None else None
    summary.update(_breakdowns(tally, summary, energy, loihi2_pj_per_op))
    if labels is not None:
        summary["confusion_matrix"] = confusion_matrix(predictions, labels.cpu(), tally.logits_t.shape[2])
    other = tally.reference
    if other is not None:
        ref_predictions = other.predictions
        summary.update(
            reference=other.target,
            reference_accuracy=(float((ref_predictions == labels).float().mean())
                                if labels is not None else None),
            agreement=float((predictions == ref_predictions).float().mean()),
            spike_mismatches=sum(tally.mismatches.values()), spike_mismatches_per_layer=tally.mismatches,
            spike_positions=sum(n * int(other.logits_t.shape[0]) * samples for n in other.neurons.values()),
            max_logit_difference=float((tally.logits_t - other.logits_t).abs().max()),
            reference_firing_rate_per_layer=other.firing_rates(),
            reference_accuracy_by_step=other.accuracy_by_step(labels) if labels is not None else None,
        )
        summary["activity_similarity"] = activity_similarity(summary["firing_rate_per_layer"],
                                                             summary["reference_firing_rate_per_layer"])
    return summary


def activity_similarity(rates: dict[str, float], reference_rates: dict[str, float]) -> float | None:
    """Cosine similarity of the per-layer mean firing rates (layers both records have):
    1 when every layer fires in the same proportions, lower as the activity profile drifts.
    None when either profile is all zero."""
    names = [name for name in reference_rates if name in rates]
    a = torch.tensor([rates[n] for n in names], dtype=torch.float64)
    b = torch.tensor([reference_rates[n] for n in names], dtype=torch.float64)
    if not names or a.norm() == 0 or b.norm() == 0:
        return None
    return float(a @ b / (a.norm() * b.norm()))


def confusion_matrix(predictions: torch.Tensor, labels: torch.Tensor, classes: int) -> list[list[int]]:
    """counts[true class][predicted class] over the samples."""
    counts = torch.zeros(classes, classes, dtype=torch.long)
    counts.index_put_((labels.long(), predictions.long()), torch.ones_like(labels, dtype=torch.long), accumulate=True)
    return counts.tolist()


def _breakdowns(tally: Tally, summary: dict, energy, loihi2_pj_per_op) -> dict:
    """Per-layer and per-step views of the counts, for the report:

    - ``first_spike_step_per_layer``: the mean step (1-based, in the target's own time: a
      layer's window starts ``pipeline position`` steps late on a pipelined chip) of each
      layer's first spike, over the samples where it spikes at all;
    - ``energy_per_layer``: the energy model applied to each layer's synaptic ops and spikes
      (neuron updates are not split by layer: ``energy_neuron_updates``);
    - ``energy_by_step``: the energy per sample of a run cut after t = 1..T steps (the input
      is constant, so a shorter run is a prefix): each layer's spikes up to t times its mean
      synaptic fan-out per spike, and neuron updates in proportion to the steps run."""
    samples, steps = tally.samples, int(tally.logits_t.shape[0])
    first = {name: (total / count if count else None) for name, (total, count) in tally.first_spike.items()}
    out = {"first_spike_step_per_layer": first, "energy_per_layer": None, "energy_by_step": None,
           "energy_neuron_updates": None}
    if energy is None:
        return out

    def joules(synops: float, spikes: float, updates: float) -> float:
        return energy({"synops_per_sample": synops, "spikes_per_sample": spikes,
                       "neuron_updates_per_sample": updates}, loihi2_pj_per_op)["j"]
    layer_spikes = {name: counts / samples for name, counts in tally.spikes_by_step.items()}
    fan_out = {name: tally.synops.get(name, 0.0) / max(float(layer_spikes[name].sum()) * samples, 1.0)
               for name in layer_spikes}
    out["energy_per_layer"] = {name: joules(summary["synops_per_layer"].get(name, 0.0),
                                            summary["spikes_per_layer"][name], 0.0) for name in layer_spikes}
    out["energy_neuron_updates"] = joules(0.0, 0.0, summary["neuron_updates_per_sample"])
    delay = tally.pipeline_delay_steps
    by_step = []
    for t in range(1, steps + 1):
        spikes_t = {name: float(counts[:t].sum()) for name, counts in layer_spikes.items()}
        synops_t = sum(spikes_t[name] * fan_out[name] for name in spikes_t)
        updates_t = summary["neuron_updates_per_sample"] * (t + delay) / (steps + delay)
        by_step.append(joules(synops_t, sum(spikes_t.values()), updates_t))
    out["energy_by_step"] = by_step
    return out
