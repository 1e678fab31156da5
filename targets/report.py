"""``stars-deploy report``: one self-contained HTML page for a run, and a Markdown summary.

The page embeds its plots as PNG (base64, so it can be mailed or archived as one file); the
same plots are written to RUN_DIR/plots/ as PNG at print resolution and as SVG beside them:

- accuracy against timesteps, and against the energy of a run of that many steps, for each
  simulated target (the input is constant, so a run of t steps is a prefix of the T run);
- per layer: spikes, synaptic operations, energy and the mean first-spike step;
- per-layer mean firing rates, float student against each target;
- a confusion matrix per target; a spike raster of one sample on the deployed target;
- the Loihi weight quantisation error per layer (export.json); the distillation curve.

Tables: every target with its samples and what it was compared with, the gates of the last
`check` per target, the Loihi quantisation, the distillation, provenance (versions, dates,
configuration, file hashes) and a glossary. ``report(format="md")`` writes RUN_DIR/report.md,
a short summary for a pull-request comment.

The simulations come from targets/simulate.py (``collect_results``); this module only draws
and writes.
"""

from __future__ import annotations

import base64
import html
import io
import time
from pathlib import Path

from stars_deploy.errors import ConfigError
from stars_deploy.fileio import read_json, write_bytes
from stars_deploy.layout import (CHECK_PREFIX, DISTILL, EXPORT_JSON, MANIFEST, PLOTS_DIR, REPORT, REPORT_MD, STUDENT,
                                 export_dir)
from stars_deploy.progress import log
from stars_deploy.units import count, of, percent, si, steps_and_time
from stars_deploy.version import __version__

from . import report_plots as plots
from .simulate import collect_results, raster_sample

FIGURE_DPI = 200  # print resolution
FORMATS = ("html", "md")
GLOSSARY = {
    "accuracy": "fraction of the evaluation images whose predicted class (argmax of the output's mean over "
                "the T steps) is the label",
    "compared with": "what the target's spikes and predictions are set against: the float student is the "
                     "run's student with BatchNorm folded, exactly as exported",
    "agreement": "fraction of images on which the target predicts what the reference (the 'compared with' "
                 "column) predicts",
    "spike mismatches": "neuron-steps whose spike differs from the reference, out of all neuron-steps "
                        "compared; float and fixed point are expected to differ a little (quantisation "
                        "flips neurons near threshold), a float export of the same student by 0",
    "synaptic ops": "spikes times the number of synapses each spike drives (its fan-out)",
    "latency": "steps from the input to the decision, the chip's pipeline delay (one step per synaptic "
               "connection) included, and that time at the file's dt",
    "stable decision step": "the mean step from which the running prediction no longer changes",
    "energy": "the target's energy model applied to the counts per sample (Loihi 1: Davies et al., IEEE "
              "Micro 2018, Table 1); energy after t steps uses each layer's spikes up to t times its mean "
              "fan-out",
    "first spike": "the mean step of a layer's first spike, over the samples in which it spikes, in the "
                   "target's own time (on the chip a layer's window starts one step after the previous one)",
}


def _read(path: Path, what: str) -> dict:
    return read_json(path, what) if path.is_file() else {}


def _encode(figure) -> tuple[bytes, bytes]:
    """(PNG at print resolution, SVG) of a figure, which is then closed."""
    png, svg = io.BytesIO(), io.BytesIO()
    figure.savefig(png, format="png", dpi=FIGURE_DPI, bbox_inches="tight")
    figure.savefig(svg, format="svg", bbox_inches="tight")
    plots.plt.close(figure)
    return png.getvalue(), svg.getvalue()


def _checks(run_dir: Path) -> dict[str, dict]:
    return {path.stem[len(CHECK_PREFIX):]: read_json(path, "check result")
            for path in sorted(Path(run_dir).glob(f"{CHECK_PREFIX}*.json"))}


def _figures(summaries: dict, raster: tuple, export: dict, distill: dict, class_names) -> dict:
    target, spikes = raster
    return {
        "accuracy_vs_timesteps": ("Accuracy against timesteps", plots.accuracy_by_step(summaries)),
        "accuracy_vs_energy": ("Accuracy against energy", plots.accuracy_by_energy(summaries)),
        "per_layer": ("Per-layer spikes, synaptic ops, energy and latency", plots.per_layer(summaries)),
        "firing_rates": ("Firing rates per layer", plots.firing_rates(summaries)),
        "confusion": ("Confusion matrices", plots.confusion(summaries, class_names)),
        "spike_raster": ("Spike raster", plots.raster(spikes, target)),
        "quantization_error": ("Weight quantisation error", plots.quantization(export.get("quantization", []))),
        "distillation": ("Distillation curve", plots.distillation(distill.get("history", []))),
    }


def _table(header: list[str], rows: list[list]) -> str:
    def cell(value) -> str:
        if isinstance(value, float):
            return f"{value:.4g}"
        return html.escape("n/a" if value is None else str(value))
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


TARGET_HEADER = ["target", "data", "samples", "compared with", "accuracy", "reference accuracy", "agreement",
                 "spike mismatches", "spikes / sample", "synaptic ops / sample", "latency", "energy / sample"]


def _target_rows(summaries: dict, dt_s: float | None) -> list[list]:
    return [[t, s.get("data"), s.get("samples"), plots.reference_name(s.get("reference")), percent(s.get("accuracy")),
             percent(s.get("reference_accuracy")), percent(s.get("agreement")),
             of(s.get("spike_mismatches"), s.get("spike_positions")), count(s.get("spikes_per_sample")),
             count(s.get("synops_per_sample")), steps_and_time(s.get("latency_steps"), dt_s), plots.energy_note(s)]
            for t, s in summaries.items()]


GATE_HEADER = ["target", "gate", "measured", "limit", "result", "samples", "checked"]


def _gate_rows(checks: dict) -> list[list]:
    return [[target, row["gate"], row["measured"], f"{row['comparison']} {row['limit']}",
             "pass" if row["passed"] else f"FAIL {row.get('note') or ''}".strip(), result.get("samples"),
             result.get("checked_at", "")]
            for target, result in checks.items() for row in result.get("gates", [])]


def _provenance(run_dir: Path, manifest: dict, export: dict, summaries: dict) -> list[list]:
    config = manifest.get("config", {})
    student, teacher = config.get("student", {}), config.get("teacher", {})
    rows = [["report made by", f"stars-deploy {__version__}, {time.strftime('%Y-%m-%d %H:%M:%S %Z')}"],
            ["run", f"{run_dir.name}: created {manifest.get('created', 'n/a')}, finished {manifest.get('finished', 'n/a')}"],
            ["distilled with", ", ".join(f"{k} {v}" for k, v in manifest.get("versions", {}).items()) or "n/a"],
            ["teacher", f"{teacher.get('arch')} ({teacher.get('weights')}, sha256 {manifest.get('teacher_sha256', 'n/a')})"],
            ["student", f"{student.get('family')} width {student.get('width')} depth {student.get('depth')}, "
                        f"T = {student.get('timesteps')}, dt = {si(manifest.get('dt_s'), 's')}"],
            ["objective", f"{config.get('objective')}; budget {config.get('budget_s')} s / {config.get('rounds')} rounds, "
                          f"seed {config.get('seed')}"]]
    rows += [[f"file {name}", f"sha256 {info['sha256']}, {count(info['bytes'])} bytes"]
             for name, info in export.get("files", {}).items()]
    rows += [[f"simulated {target}", f"{s.get('file')} (sha256 {s.get('file_sha256')}), request {s.get('request')}"]
             for target, s in summaries.items()]
    return rows


def _html(title: str, sections: list[str]) -> str:
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;max-width:1200px;margin:2em auto;color:#222}}
table{{border-collapse:collapse;margin:0.5em 0}}td,th{{border:1px solid #bbb;padding:3px 8px;text-align:right}}
th{{background:#eee}}img{{max-width:100%}}.missing{{color:#777}}dt{{font-weight:bold}}</style></head>
<body><h1>{html.escape(title)}</h1>
{''.join(sections)}
</body></html>
"""


def _markdown(run_dir: Path, summaries: dict, checks: dict, distill: dict, dt_s: float | None) -> str:
    lines = [f"### stars-deploy: {run_dir.name}", ""]
    if distill:
        lines.append(f"Student {percent(distill.get('student_accuracy'))} (teacher "
                     f"{percent(distill.get('teacher_accuracy'))}, agreement {percent(distill.get('agreement'))}) "
                     f"after {distill.get('rounds')} rounds on {distill.get('eval_data', 'no evaluation data')}.")
        lines.append("")
    if summaries:
        lines += ["| target | samples | compared with | accuracy | agreement | spikes / sample | latency | energy |",
                  "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {t} | {s.get('samples')} | {plots.reference_name(s.get('reference'))} | {percent(s.get('accuracy'))} "
                  f"| {percent(s.get('agreement'))} | {count(s.get('spikes_per_sample'))} | "
                  f"{steps_and_time(s.get('latency_steps'), dt_s)} | {plots.energy_note(s)} |"
                  for t, s in summaries.items()]
        lines.append("")
    for target, result in checks.items():
        verdict = "all gates passed" if result.get("passed") else "**GATE FAILED**"
        lines.append(f"Gates on {target} ({result.get('samples')} samples): {verdict}")
        lines += [f"- {'pass' if r['passed'] else '**FAIL**'} {r['gate']}: {r['measured']} {r['comparison']} {r['limit']}"
                  for r in result.get("gates", [])]
        lines.append("")
    lines.append(f"_stars-deploy {__version__}; full report: {REPORT}_")
    return "\n".join(lines) + "\n"


def write_report(run_dir: Path, data: str | None = None, samples: int | None = None, device: str = "auto",
                 format: str = "html") -> dict:
    """Write RUN_DIR/report.html and RUN_DIR/plots/ (``format="html"``), or RUN_DIR/report.md
    (``format="md"``, returned as ``markdown`` too); returns what was written."""
    run_dir = Path(run_dir)
    if format not in FORMATS:
        raise ConfigError(f"--format {format!r}: choose one of {', '.join(FORMATS)}")
    if not (run_dir / STUDENT).is_file():
        raise ConfigError(f"{run_dir} is not a run directory (no {STUDENT})")
    manifest = _read(run_dir / MANIFEST, "run manifest")
    distill = _read(run_dir / DISTILL, "distillation record")
    export = _read(export_dir(run_dir) / EXPORT_JSON, "export record")
    summaries = collect_results(run_dir, data, samples, device)
    checks = _checks(run_dir)
    dt_s = manifest.get("dt_s") or export.get("dt_s")
    if format == "md":
        markdown = _markdown(run_dir, summaries, checks, distill, dt_s)
        write_bytes(run_dir / REPORT_MD, markdown.encode())
        return {"report": str(run_dir / REPORT_MD), "plots": [], "targets": list(summaries), "markdown": markdown}
    class_names = manifest.get("config", {}).get("teacher", {}).get("class_names") or None
    figures = _figures(summaries, raster_sample(run_dir, summaries, device), export, distill, class_names)
    sections, written = [], []
    for name, (title, figure) in figures.items():
        if figure is None:
            sections.append(f"<h2>{title}</h2><p class='missing'>Nothing to plot: no data for it in this run.</p>")
            continue
        png, svg = _encode(figure)
        for suffix, content in ((".png", png), (".svg", svg)):
            write_bytes(run_dir / PLOTS_DIR / f"{name}{suffix}", content)
            written.append(f"{PLOTS_DIR}/{name}{suffix}")
        sections.append(f"<h2>{title}</h2><img alt='{html.escape(title)}' "
                        f"src='data:image/png;base64,{base64.b64encode(png).decode()}'>"
                        f"<p><a href='{PLOTS_DIR}/{name}.svg'>SVG</a></p>")
    tables = ["<h2>Targets</h2>" + _table(TARGET_HEADER, _target_rows(summaries, dt_s))]
    if checks:
        tables.append("<h2>Gates</h2>" + _table(GATE_HEADER, _gate_rows(checks)))
    tables += [
        "<h2>Loihi quantisation</h2>" + _table(
            ["layer", "kind", "exponent", "scale", "weights", "clipped", "RMS rel. error", "max abs error"],
            [[q.get("layer"), q.get("kind"), q.get("exponent"), q.get("scale"), q.get("weights"),
              q.get("weights_clipped"), q.get("weight_rms_relative_error"), q.get("weight_max_abs_error")]
             for q in export.get("quantization", [])]),
        "<h2>Distillation</h2>" + _table(["teacher accuracy", "student accuracy", "agreement with the teacher",
                                          "rounds", "synthetic images", "wall time"],
                                         [[percent(distill.get("teacher_accuracy")), percent(distill.get("student_accuracy")),
                                           percent(distill.get("agreement")), distill.get("rounds"),
                                           count(distill.get("synthetic_images")), si(distill.get("wall_time_s"), "s")]]),
    ]
    ending = ["<h2>Provenance</h2>" + _table(["what", "value"], _provenance(run_dir, manifest, export, summaries)),
              "<h2>Glossary</h2><dl>" + "".join(f"<dt>{html.escape(term)}</dt><dd>{html.escape(text)}</dd>"
                                              for term, text in GLOSSARY.items()) + "</dl>"]
    page = _html(f"stars-deploy report: {run_dir.name}", tables + sections + ending)
    write_bytes(run_dir / REPORT, page.encode())
    log(f"report: {run_dir / REPORT} ({len(figures)} plots)")
    return {"report": str(run_dir / REPORT), "plots": written, "targets": list(summaries)}
