"""The report's figures (matplotlib, no display): each function takes the stored summaries and
returns a figure, or None when the run has no data for it.

Every curve and bar says which target it is, on how many samples, and against what reference
(``label``), so that results of different requests are never mixed silently.
"""

from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")  # no display: files only
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from stars_deploy.units import si  # noqa: E402

RASTER_NEURONS = 256  # neurons drawn per layer in the raster (evenly spaced when a layer has more)
REFERENCE_NAMES = {"student": "float student"}


def reference_name(reference: str | None) -> str:
    return REFERENCE_NAMES.get(reference, reference or "nothing")


def label(target: str, summary: dict) -> str:
    """``loihi, 450 samples, vs float student``."""
    return f"{target}, {summary.get('samples')} samples, vs {reference_name(summary.get('reference'))}"


def accuracy_by_step(summaries: dict[str, dict]):
    curves = {t: s for t, s in summaries.items() if s.get("accuracy_by_step")}
    if not curves:
        return None
    figure, axis = plt.subplots(figsize=(6.4, 3.8))
    drawn = set()
    for target, summary in curves.items():
        reference = summary.get("reference_accuracy_by_step")
        key = (summary.get("reference"), summary.get("samples"))
        if reference and summary.get("reference") == "student" and key not in drawn:
            drawn.add(key)
            axis.plot(range(1, len(reference) + 1), [100 * a for a in reference], "k--",
                      label=f"float student, {summary.get('samples')} samples")
        curve = summary["accuracy_by_step"]
        axis.plot(range(1, len(curve) + 1), [100 * a for a in curve], marker="o", label=label(target, summary))
    axis.set_xticks(range(1, max(len(s["accuracy_by_step"]) for s in curves.values()) + 1))
    axis.set(xlabel="timesteps run", ylabel="accuracy (%)", title="Accuracy against timesteps")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    return figure


def accuracy_by_energy(summaries: dict[str, dict]):
    """Accuracy after t steps against the energy per sample of a t-step run, per target."""
    curves = {t: s for t, s in summaries.items() if s.get("accuracy_by_step") and s.get("energy_by_step")}
    if not curves:
        return None
    figure, axis = plt.subplots(figsize=(6.4, 3.8))
    for target, summary in curves.items():
        energy = [1e6 * j for j in summary["energy_by_step"]]  # µJ
        accuracy = [100 * a for a in summary["accuracy_by_step"]]
        axis.plot(energy, accuracy, marker="o", label=label(target, summary))
        for step, (x, y) in enumerate(zip(energy, accuracy), start=1):
            axis.annotate(f"T={step}", (x, y), fontsize=7, xytext=(3, -9), textcoords="offset points")
    model = next(iter(curves.values()))["energy_per_sample"].get("model", "")
    axis.set(xlabel=f"energy per sample (µJ, {model} estimate)", ylabel="accuracy (%)",
             title="Accuracy against energy (each point: a run of T steps)")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    return figure


def _grouped_bars(axis, series: dict[str, dict[str, float]], layers: list[str], ylabel: str, log: bool = False):
    width = 0.8 / max(len(series), 1)
    for index, (name, values) in enumerate(series.items()):
        positions = [i + (index - (len(series) - 1) / 2) * width for i in range(len(layers))]
        heights = [values.get(layer) or 0.0 for layer in layers]
        axis.bar(positions, heights, width, label=name)
    axis.set_xticks(range(len(layers)), layers, rotation=30, ha="right", fontsize=8)
    axis.set_ylabel(ylabel, fontsize=8)
    if log and any(v for values in series.values() for v in values.values() if v):
        axis.set_yscale("log")


def per_layer(summaries: dict[str, dict]):
    """Per layer and target: spikes, synaptic ops, energy and the mean first-spike step."""
    layers = list(next((s["spikes_per_layer"] for s in summaries.values() if s.get("spikes_per_layer")), {}))
    if not layers:
        return None
    figure, axes = plt.subplots(2, 2, figsize=(max(8, 1.1 * len(layers) * len(summaries)), 6.4))
    panels = (("spikes_per_layer", "spikes / sample", True), ("synops_per_layer", "synaptic ops / sample", True),
              ("energy_per_layer", "energy / sample (J)", True), ("first_spike_step_per_layer",
                                                                  "first spike: mean step", False))
    for axis, (key, ylabel, log) in zip(axes.flat, panels):
        series = {label(t, s): s.get(key) or {} for t, s in summaries.items()}
        _grouped_bars(axis, series, layers, ylabel, log)
    axes.flat[0].legend(fontsize=7)
    figure.suptitle("Per layer")
    figure.tight_layout()
    return figure


def firing_rates(summaries: dict[str, dict]):
    series, layers = {}, []
    for target, summary in summaries.items():
        if summary.get("reference") == "student" and summary.get("reference_firing_rate_per_layer"):
            series.setdefault(f"float student, {summary.get('samples')} samples",
                              summary["reference_firing_rate_per_layer"])
        series[label(target, summary)] = summary.get("firing_rate_per_layer") or {}
        layers = layers or list(summary.get("firing_rate_per_layer") or {})
    if not layers:
        return None
    figure, axis = plt.subplots(figsize=(max(6.4, 0.9 * len(layers) * len(series)), 3.8))
    _grouped_bars(axis, series, layers, "spikes per neuron per step")
    axis.set_title("Mean firing rate per layer")
    axis.legend(fontsize=8)
    return figure


def confusion(summaries: dict[str, dict], class_names: list[str] | None):
    matrices = {t: s for t, s in summaries.items() if s.get("confusion_matrix")}
    if not matrices:
        return None
    columns = len(matrices)
    figure, axes = plt.subplots(1, columns, figsize=(4.2 * columns, 4.0), squeeze=False)
    for axis, (target, summary) in zip(axes[0], matrices.items()):
        counts = torch.tensor(summary["confusion_matrix"], dtype=torch.float64)
        rows = counts / counts.sum(1, keepdim=True).clamp_min(1)
        axis.imshow(rows.numpy(), cmap="Blues", vmin=0, vmax=1)
        classes = len(counts)
        names = class_names if class_names and len(class_names) == classes else [str(i) for i in range(classes)]
        axis.set_xticks(range(classes), names, rotation=90, fontsize=6)
        axis.set_yticks(range(classes), names, fontsize=6)
        axis.set(xlabel="predicted", ylabel="true class", title=f"{target}, {summary.get('samples')} samples")
        if classes <= 12:
            for i in range(classes):
                for j in range(classes):
                    if counts[i, j]:
                        axis.text(j, i, int(counts[i, j]), ha="center", va="center", fontsize=6,
                                  color="white" if rows[i, j] > 0.5 else "black")
    figure.suptitle("Confusion matrices (row-normalised colour, counts written)")
    figure.tight_layout()
    return figure


def raster(spikes: dict[str, torch.Tensor], target: str | None):
    if not spikes:
        return None
    figure, axes = plt.subplots(1, len(spikes), figsize=(2.4 * len(spikes) + 1, 3.6), squeeze=False)
    for axis, (layer, tensor) in zip(axes[0], spikes.items()):
        flat = tensor[:, 0].reshape(tensor.shape[0], -1).float()  # (T, neurons) of the first sample
        keep = torch.linspace(0, flat.shape[1] - 1, min(RASTER_NEURONS, flat.shape[1])).long()
        steps, neurons = flat[:, keep].nonzero(as_tuple=True)
        axis.scatter(steps.numpy(), neurons.numpy(), s=4, marker="|", color="k")
        axis.set(title=layer, xlabel="step", xlim=(-0.5, flat.shape[0] - 0.5), ylim=(-1, len(keep)))
    axes[0][0].set_ylabel("neuron (sampled)")
    figure.suptitle(f"Spike raster, sample 0, {target}")
    return figure


def quantization(rows: list[dict]):
    rows = [row for row in rows if "weight_rms_relative_error" in row]
    if not rows:
        return None
    figure, axis = plt.subplots(figsize=(6.4, 3.8))
    axis.bar([row["layer"] for row in rows], [100 * row["weight_rms_relative_error"] for row in rows])
    axis.set(ylabel="RMS weight error (% of RMS weight)", title="Loihi 8-bit weight quantisation error")
    axis.tick_params(axis="x", rotation=30)
    return figure


def distillation(history: list[dict]):
    points = [h for h in history if "student_accuracy" in h]
    if not points:
        return None
    figure, axis = plt.subplots(figsize=(6.4, 3.8))
    rounds = [h["round"] for h in points]
    axis.plot(rounds, [100 * h["student_accuracy"] for h in points], marker="o", label="student accuracy")
    axis.plot(rounds, [100 * h["agreement"] for h in points], marker="s", label="agreement with the teacher")
    axis.set(xlabel="round", ylabel="%", title="Distillation (on the run's evaluation data)")
    axis.grid(alpha=0.3)
    axis.legend()
    return figure


def energy_note(summary: dict) -> str:
    energy = summary.get("energy_per_sample") or {}
    return f"{si(energy.get('j'), 'J')} ({energy.get('model', 'no model')})" if energy else "no energy model"


def is_finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)
