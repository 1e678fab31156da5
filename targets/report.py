"""``stars-deploy report``: one self-contained HTML page for a run, with PNG plots.

The page embeds its plots (base64 PNG, so it can be mailed or archived as one file) and the
same plots are written to RUN_DIR/plots/*.png:

- accuracy against timesteps for each simulated target and the float student (the running-mean
  decision after t steps: the input is constant, so a run of t steps is a prefix of the T run);
- per-layer mean firing rates, float student against each target;
- a spike raster of one sample on the deployed target (loihi when exported, else nir);
- the Loihi weight quantisation error per layer (export.json);
- the distillation curve (accuracy and agreement at each evaluation).

The simulations come from targets/simulate.py (``collect_results``: the stored
simulate-<target>.json where present, else a fresh run of every target whose registry record
says ``report_simulates``); this module only draws and writes.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display: files only
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from stars_deploy.errors import ConfigError  # noqa: E402
from stars_deploy.fileio import read_json, write_bytes  # noqa: E402
from stars_deploy.layout import DISTILL, EXPORT_JSON, MANIFEST, PLOTS_DIR, REPORT, STUDENT, export_dir  # noqa: E402
from stars_deploy.progress import log  # noqa: E402
from stars_deploy.units import percent  # noqa: E402

from .simulate import collect_results, raster_sample  # noqa: E402

RASTER_NEURONS = 256  # neurons drawn per layer in the raster (evenly spaced when a layer has more)
FIGURE_DPI = 110


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=FIGURE_DPI, bbox_inches="tight")
    plt.close(figure)
    return buffer.getvalue()


def _accuracy_plot(summaries: dict[str, dict]) -> bytes | None:
    curves = {t: s["accuracy_by_step"] for t, s in summaries.items() if s.get("accuracy_by_step")}
    if not curves:
        return None
    figure, axis = plt.subplots(figsize=(6, 3.6))
    reference = next((s for s in summaries.values() if s.get("reference") == "student"
                      and s.get("reference_accuracy_by_step")), None)
    if reference is not None:
        steps = range(1, len(reference["reference_accuracy_by_step"]) + 1)
        axis.plot(steps, [100 * a for a in reference["reference_accuracy_by_step"]], "k--", label="float student")
    for target, curve in curves.items():
        axis.plot(range(1, len(curve) + 1), [100 * a for a in curve], marker="o", label=target)
    axis.set_xticks(range(1, max(len(c) for c in curves.values()) + 1))
    axis.set(xlabel="timesteps", ylabel="accuracy (%)", title="Accuracy against timesteps")
    axis.grid(alpha=0.3)
    axis.legend()
    return _png(figure)


def _rates_plot(summaries: dict[str, dict]) -> bytes | None:
    series = {}
    for target, summary in summaries.items():
        if summary.get("reference") == "student" and "float student" not in series:
            series["float student"] = summary.get("reference_firing_rate_per_layer") or {}
        series[target] = summary.get("firing_rate_per_layer") or {}
    layers = list(next((rates for rates in series.values() if rates), {}))
    if not layers:
        return None
    figure, axis = plt.subplots(figsize=(max(6, 0.9 * len(layers) * len(series)), 3.6))
    width = 0.8 / len(series)
    for index, (name, rates) in enumerate(series.items()):
        positions = [i + (index - (len(series) - 1) / 2) * width for i in range(len(layers))]
        axis.bar(positions, [rates.get(layer, 0.0) for layer in layers], width, label=name)
    axis.set_xticks(range(len(layers)), layers, rotation=30, ha="right")
    axis.set(ylabel="spikes per neuron per step", title="Mean firing rate per layer")
    axis.legend()
    return _png(figure)


def _raster_plot(spikes: dict[str, torch.Tensor], target: str) -> bytes | None:
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
    return _png(figure)


def _quantization_plot(rows: list[dict]) -> bytes | None:
    rows = [row for row in rows if "weight_rms_relative_error" in row]
    if not rows:
        return None
    figure, axis = plt.subplots(figsize=(6, 3.6))
    axis.bar([row["layer"] for row in rows], [100 * row["weight_rms_relative_error"] for row in rows])
    axis.set(ylabel="RMS weight error (% of RMS weight)", title="Loihi 8-bit weight quantisation error")
    axis.tick_params(axis="x", rotation=30)
    return _png(figure)


def _distillation_plot(history: list[dict]) -> bytes | None:
    points = [h for h in history if "student_accuracy" in h]
    if not points:
        return None
    figure, axis = plt.subplots(figsize=(6, 3.6))
    rounds = [h["round"] for h in points]
    axis.plot(rounds, [100 * h["student_accuracy"] for h in points], marker="o", label="student accuracy")
    axis.plot(rounds, [100 * h["agreement"] for h in points], marker="s", label="agreement with teacher")
    axis.set(xlabel="round", ylabel="%", title="Distillation")
    axis.grid(alpha=0.3)
    axis.legend()
    return _png(figure)


def _table(header: list[str], rows: list[list]) -> str:
    def cell(value) -> str:
        if isinstance(value, float):
            return f"{value:.4g}"
        return html.escape("n/a" if value is None else str(value))
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _read(path: Path, what: str) -> dict:
    return read_json(path, what) if path.is_file() else {}


def _plots(summaries: dict[str, dict], raster: tuple[str | None, dict], export: dict, distill: dict) -> dict:
    raster_target, raster_spikes = raster
    return {
        "accuracy_vs_timesteps": ("Accuracy against timesteps", _accuracy_plot(summaries)),
        "firing_rates": ("Firing rates per layer", _rates_plot(summaries)),
        "spike_raster": ("Spike raster", _raster_plot(raster_spikes, raster_target)),
        "quantization_error": ("Weight quantisation error", _quantization_plot(export.get("quantization", []))),
        "distillation": ("Distillation curve", _distillation_plot(distill.get("history", []))),
    }


def _tables(summaries: dict[str, dict], export: dict, distill: dict) -> list[str]:
    target_rows = [[t, s.get("data"), s.get("samples"), percent(s.get("accuracy")), percent(s.get("reference_accuracy")),
                    percent(s.get("agreement")), s.get("spike_mismatches"), s.get("spikes_per_sample"),
                    s.get("synops_per_sample"), s.get("neuron_updates_per_sample"), s.get("latency_steps"),
                    (s.get("energy_per_sample") or {}).get("loihi1_j")] for t, s in summaries.items()]
    return [
        "<h2>Targets</h2>" + _table(["target", "data", "samples", "accuracy", "float student", "agreement",
                                     "spike mismatches", "spikes / sample", "synops / sample",
                                     "neuron updates / sample", "latency (steps)", "Loihi 1 energy / sample (J)"],
                                    target_rows),
        "<h2>Loihi quantisation</h2>" + _table(
            ["layer", "kind", "exponent", "scale", "weights", "clipped", "RMS rel. error", "max abs error"],
            [[q.get("layer"), q.get("kind"), q.get("exponent"), q.get("scale"), q.get("weights"),
              q.get("weights_clipped"), q.get("weight_rms_relative_error"), q.get("weight_max_abs_error")]
             for q in export.get("quantization", [])]),
        "<h2>Distillation</h2>" + _table(["teacher accuracy", "student accuracy", "agreement", "rounds",
                                          "synthetic images", "wall time (s)"],
                                         [[distill.get("teacher_accuracy"), distill.get("student_accuracy"),
                                           distill.get("agreement"), distill.get("rounds"),
                                           distill.get("synthetic_images"), distill.get("wall_time_s")]]),
    ]


def _page(title: str, manifest: dict, tables: list[str], sections: list[str]) -> str:
    config = manifest.get("config", {})
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}}
table{{border-collapse:collapse;margin:0.5em 0}}td,th{{border:1px solid #bbb;padding:3px 8px;text-align:right}}
th{{background:#eee}}img{{max-width:100%}}.missing{{color:#777}}</style></head>
<body><h1>{html.escape(title)}</h1>
<p>Teacher {html.escape(str(config.get('teacher', {}).get('arch', 'n/a')))},
student {html.escape(str(config.get('student', {}).get('family', 'n/a')))},
objective {html.escape(str(config.get('objective', 'n/a')))}.</p>
{''.join(tables)}
{''.join(sections)}
</body></html>
"""


def write_report(run_dir: Path, data: str | None = None, samples: int | None = None, device: str = "auto") -> dict:
    """Write RUN_DIR/report.html and RUN_DIR/plots/*.png; returns what was written."""
    run_dir = Path(run_dir)
    if not (run_dir / STUDENT).is_file():
        raise ConfigError(f"{run_dir} is not a run directory (no {STUDENT})")
    manifest = _read(run_dir / MANIFEST, "run manifest")
    distill = _read(run_dir / DISTILL, "distillation record")
    export = _read(export_dir(run_dir) / EXPORT_JSON, "export record")
    summaries = collect_results(run_dir, data, samples, device)
    plots = _plots(summaries, raster_sample(run_dir, summaries, device), export, distill)
    sections, written = [], []
    for name, (title, png) in plots.items():
        if png is None:
            sections.append(f"<h2>{title}</h2><p class='missing'>Nothing to plot: no data for it in this run.</p>")
            continue
        write_bytes(run_dir / PLOTS_DIR / f"{name}.png", png)
        written.append(f"{PLOTS_DIR}/{name}.png")
        sections.append(f"<h2>{title}</h2><img alt='{html.escape(title)}' "
                        f"src='data:image/png;base64,{base64.b64encode(png).decode()}'>")
    page = _page(f"stars-deploy report: {run_dir.name}", manifest, _tables(summaries, export, distill), sections)
    write_bytes(run_dir / REPORT, page.encode())
    log(f"report: {run_dir / REPORT} ({len(written)} plots)")
    return {"report": str(run_dir / REPORT), "plots": written, "targets": list(summaries)}
