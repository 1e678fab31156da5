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
        """Accuracy of the running-mean decision after 1, 2, ..., T steps: what the target
        scores when run for fewer steps (the input is constant, so a shorter run is a prefix)."""
        running = self.logits_t.cumsum(0).argmax(2).cpu()  # (T, B)
        return [float(v) for v in (running == labels.view(1, -1)).float().mean(1)]

    def stable_decision_steps(self) -> torch.Tensor:
        """(B,) first step (1-based) from which the running-mean prediction never changes."""
        running = self.logits_t.cumsum(0).argmax(2)  # (T, B); argmax of the sum == of the mean
        final = running[-1]
        differs = (running != final).flip(0).int().cumsum(0).flip(0) > 0  # a later change exists
        return differs.sum(0) + 1

    def cpu(self) -> "TargetResult":
        return TargetResult(self.target, self.logits_t.cpu(), {k: v.cpu() for k, v in self.spikes.items()},
                            dict(self.synops), dict(self.timings_s), self.latency_steps,
                            self.pipeline_delay_steps, self.neuron_updates, self.input_clipped, self.energy)


def concat_results(results: list[TargetResult]) -> TargetResult:
    """One record for the batches of ``results`` (same target and layers), in order."""
    first = results[0]
    timings = {key: sum(r.timings_s.get(key, 0.0) for r in results) for key in first.timings_s}
    return TargetResult(first.target, torch.cat([r.logits_t for r in results], 1),
                        {name: torch.cat([r.spikes[name] for r in results], 1) for name in first.spikes},
                        {name: sum(r.synops[name] for r in results) for name in first.synops},
                        timings, first.latency_steps, first.pipeline_delay_steps,
                        sum(r.neuron_updates for r in results), sum(r.input_clipped for r in results), first.energy)


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


def summarize(result: TargetResult, labels: torch.Tensor | None = None,
              reference: TargetResult | None = None, energy=MODEL, loihi2_pj_per_op: float | None = None) -> dict:
    """The metrics every target reports: accuracy, agreement and spike mismatches against
    ``reference``, spikes, synaptic ops and neuron updates per sample, latency, and the
    energy per sample from ``energy`` (by default the model the result carries, energy.py;
    None: no estimate)."""
    samples = result.samples
    predictions = result.predictions.cpu()
    spike_counts = result.spike_counts()
    summary = {
        "target": result.target, "samples": samples,
        "accuracy": float((predictions == labels).float().mean()) if labels is not None else None,
        "spikes_per_sample": sum(spike_counts.values()) / samples,
        "spikes_per_layer": {k: v / samples for k, v in spike_counts.items()},
        "synops_per_sample": sum(result.synops.values()) / samples,
        "synops_per_layer": {k: v / samples for k, v in result.synops.items()},
        "latency_steps": result.latency_steps,
        "pipeline_delay_steps": result.pipeline_delay_steps,
        "stable_decision_step_mean": float(result.stable_decision_steps().float().mean()),
        "timesteps": int(result.logits_t.shape[0]),
        "timings_s": result.timings_s,
        "neuron_updates_per_sample": result.neuron_updates / samples,
        "input_clipped": result.input_clipped,
        "firing_rate_per_layer": result.firing_rates(),
        "accuracy_by_step": result.accuracy_by_step(labels) if labels is not None else None,
    }
    if energy is MODEL:
        energy = result.energy
    summary["energy_per_sample"] = energy(summary, loihi2_pj_per_op) if energy is not None else None
    summary.update(_breakdowns(result, summary, energy, loihi2_pj_per_op))
    if labels is not None:
        summary["confusion_matrix"] = confusion_matrix(predictions, labels.cpu(), result.logits_t.shape[2])
    if reference is not None:
        per_layer = spike_mismatches(result, reference)
        ref_predictions = reference.predictions.cpu()
        summary.update(
            reference=reference.target,
            reference_accuracy=(float((ref_predictions == labels).float().mean())
                                if labels is not None else None),
            agreement=float((predictions == ref_predictions).float().mean()),
            spike_mismatches=sum(per_layer.values()), spike_mismatches_per_layer=per_layer,
            spike_positions=sum(int(s.numel()) for s in reference.spikes.values()),
            max_logit_difference=float((result.logits_t.cpu() - reference.logits_t.cpu()).abs().max()),
            reference_firing_rate_per_layer=reference.firing_rates(),
            reference_accuracy_by_step=reference.accuracy_by_step(labels) if labels is not None else None,
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


def _breakdowns(result: TargetResult, summary: dict, energy, loihi2_pj_per_op) -> dict:
    """Per-layer and per-step views of the counts, for the report:

    - ``first_spike_step_per_layer``: the mean step (1-based, in the target's own time: a
      layer's window starts ``pipeline position`` steps late on a pipelined chip) of each
      layer's first spike, over the samples where it spikes at all;
    - ``energy_per_layer``: the energy model applied to each layer's synaptic ops and spikes
      (neuron updates are not split by layer: ``energy_neuron_updates``);
    - ``energy_by_step``: the energy per sample of a run cut after t = 1..T steps (the input
      is constant, so a shorter run is a prefix): each layer's spikes up to t times its mean
      synaptic fan-out per spike, and neuron updates in proportion to the steps run."""
    samples, steps = result.samples, int(result.logits_t.shape[0])
    pipelined = result.pipeline_delay_steps > 0
    first = {}
    for position, (name, spikes) in enumerate(result.spikes.items()):
        fired = spikes.flatten(2).sum(2) > 0  # (T, B)
        any_spike = fired.any(0)
        step = fired.float().argmax(0) + 1 + (position if pipelined else 0)
        first[name] = float(step[any_spike].float().mean()) if bool(any_spike.any()) else None
    out = {"first_spike_step_per_layer": first, "energy_per_layer": None, "energy_by_step": None,
           "energy_neuron_updates": None}
    if energy is None:
        return out
    def joules(synops: float, spikes: float, updates: float) -> float:
        return energy({"synops_per_sample": synops, "spikes_per_sample": spikes,
                       "neuron_updates_per_sample": updates}, loihi2_pj_per_op)["j"]
    layer_spikes = {name: s.flatten(2).sum(2).sum(1).double() / samples for name, s in result.spikes.items()}
    fan_out = {name: result.synops.get(name, 0.0) / max(float(layer_spikes[name].sum()) * samples, 1.0)
               for name in result.spikes}
    out["energy_per_layer"] = {name: joules(summary["synops_per_layer"].get(name, 0.0),
                                            summary["spikes_per_layer"][name], 0.0) for name in result.spikes}
    out["energy_neuron_updates"] = joules(0.0, 0.0, summary["neuron_updates_per_sample"])
    delay = result.pipeline_delay_steps
    by_step = []
    for t in range(1, steps + 1):
        spikes_t = {name: float(counts[:t].sum()) for name, counts in layer_spikes.items()}
        synops_t = sum(spikes_t[name] * fan_out[name] for name in spikes_t)
        updates_t = summary["neuron_updates_per_sample"] * (t + delay) / (steps + delay)
        by_step.append(joules(synops_t, sum(spikes_t.values()), updates_t))
    out["energy_by_step"] = by_step
    return out
