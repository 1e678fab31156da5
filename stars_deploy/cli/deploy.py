"""``stars-deploy export`` and ``stars-deploy simulate``: parse options, call one library function.

The targets and export kinds come from their registries (exporters/registry.py,
targets/registry.py): nothing here names one.
"""

from __future__ import annotations

from pathlib import Path

import click

from stars_deploy.exporters.registry import EXPORTS, export_kind
from stars_deploy.targets.registry import compare_choices, target_names, targets
from stars_deploy.units import count, of, percent, si, steps_and_time

from .common import (POSITIVE_FLOAT, LazyChoice, TopicCommand, device_option, emit, option, output_options, quiet_if,
                     run_dir_or_latest, runs_dir_option, table)


def _export_help() -> str:
    return "; ".join(f"{name}: {kind.summary}" for name, kind in EXPORTS.items())


@click.command(cls=TopicCommand)
@click.argument("run_dir", required=False, type=click.Path(path_type=Path, exists=True))
@option("--target", type=LazyChoice(lambda: list(EXPORTS)), default="nir", topic="Export",
        help=f"What to export. {_export_help()}.")
@option("--teacher", "with_teacher", is_flag=True, topic="Export", show_default=False,
        help="ONNX only: export the teacher too.")
@option("--dt-s", type=POSITIVE_FLOAT, default=None, topic="Foreign files", show_default="the file's dt_s",
        help="Loihi: integration step in seconds, for .nir files without dt_s metadata.")
@option("--timesteps", "-T", type=click.IntRange(min=1), default=None, topic="Foreign files",
        show_default="the file's", help="Loihi: steps per sample, for .nir files without it.")
@runs_dir_option
@output_options
def export(run_dir, target, with_teacher, dt_s, timesteps, runs_dir, as_json, quiet):
    """Export a run's student (default: the latest run) to RUN_DIR/export/ and print its layers.

    With --target loihi, RUN_DIR may also be any .nir file (written beside it as FILE.net)."""
    from stars_deploy import api

    quiet_if(quiet)
    payload = api.export(run_dir_or_latest(run_dir, runs_dir), target, teacher=with_teacher, dt_s=dt_s,
                         timesteps=timesteps)
    if as_json:
        emit(payload, True, [])
        return
    header = ("layer", "type", "input", "output", "params", "kernel/stride")
    rows = [(row["name"], row["type"], "x".join(map(str, row["input_shape"] or [])),
             "x".join(map(str, row["output_shape"] or [])), f"{row['parameters']:,}",
             f"{row['kernel']}/{row['stride']}" if "kernel" in row else "") for row in payload["layers"]]
    table(header, rows)
    for line in export_kind(target).report_lines(payload):
        click.echo(line)
    for name, info in payload["files"].items():
        click.echo(f"{name}: {info['bytes']:,} bytes, sha256 {info['sha256'][:16]}...")
    where = Path(payload["run_dir"]) / "export" if "run_dir" in payload else Path(payload["source"]).parent
    click.echo(f"parameters: {payload['parameters']:,}; written to {where}")


def _target_help() -> str:
    return "; ".join(f"{name}: {spec.summary}" for name, spec in targets().items())


def _all_compares() -> list[str]:
    names = []
    for spec in targets().values():
        names += [name for name in compare_choices(spec) if name not in names]
    return names


@click.command(cls=TopicCommand)
@click.argument("path", required=False, type=click.Path(path_type=Path, exists=True))
@option("--target", type=LazyChoice(target_names), default="nir", topic="Target", help=f"{_target_help()}.")
@option("--data", default=None, topic="Evaluation", show_default="the run's evaluation data, else digits",
        help="digits, a .npz file or a CIFAR folder.")
@option("--samples", type=click.IntRange(min=1), default=None, topic="Evaluation", show_default="all",
        help="Only the first N images.")
@option("--inputs", "inputs", type=click.Path(path_type=Path, dir_okay=False), default=None, topic="Evaluation",
        show_default="none: images from --data",
        help="An .npz with the inputs themselves: 'inputs' (N, ...) or 'sequences' (N, T, ...), optional 'labels' "
             "(docs/deploy.md); how a netx file from another tool is fed.")
@option("--compare", type=LazyChoice(_all_compares), default=None, topic="Evaluation",
        show_default="student inside a run, else none",
        help="What to compare with: the run's folded student, another target on the same export, or none.")
@option("--dt-s", type=POSITIVE_FLOAT, default=None, topic="Foreign files", show_default="the file's dt_s",
        help="Integration step in seconds, for files without dt_s metadata.")
@option("--timesteps", "-T", type=click.IntRange(min=1), default=None, topic="Foreign files",
        show_default="the file's", help="Steps per sample, for files without metadata.")
@device_option()
@option("--loihi2-pj-per-op", type=POSITIVE_FLOAT, default=None, topic="Energy", show_default="none: no Loihi 2 estimate",
        help="Energy per synaptic op or neuron update on Loihi 2, in pJ (no primary figure is published).")
@runs_dir_option
@output_options
def simulate(path, target, data, samples, inputs, compare, dt_s, timesteps, device, loihi2_pj_per_op, runs_dir,
             as_json, quiet):
    """Run an exported file (PATH: a .nir/.net file or a run directory; default: the latest run)."""
    from stars_deploy import api
    from stars_deploy.devices import resolve_device

    quiet_if(quiet)
    resolve_device(device)  # before any file is read
    summary = api.simulate(run_dir_or_latest(path, runs_dir), target, data=data, samples=samples, compare=compare,
                           dt_s=dt_s, timesteps=timesteps, device=device, loihi2_pj_per_op=loihi2_pj_per_op,
                           inputs=inputs)
    emit(summary, as_json, summary_rows(summary))


def summary_rows(summary: dict) -> list[tuple[str, str]]:
    """The simulation summary as labelled lines, every number with its unit or denominator."""
    energy = summary["energy_per_sample"] or {}
    reference = {"student": "float student", None: "reference"}.get(summary["compare"], summary["compare"])
    rows = [("target", summary["target"]), ("file", summary["file"]), ("data", f"{summary['data']}, "
            f"{summary['samples']} samples"), ("accuracy", percent(summary["accuracy"])),
            (f"{reference} accuracy", percent(summary["reference_accuracy"])),
            (f"agreement with the {reference}", percent(summary["agreement"])),
            ("spike mismatches", of(summary["spike_mismatches"], summary.get("spike_positions"))
             + (" neuron-steps" if summary["spike_mismatches"] is not None else "")),
            ("spikes / sample", count(summary["spikes_per_sample"])),
            ("synaptic ops / sample", count(summary["synops_per_sample"])),
            ("latency", steps_and_time(summary["latency_steps"], summary.get("dt_s"))
             + f", pipeline delay {summary['pipeline_delay_steps']}"),
            ("decision stable from", f"step {summary['stable_decision_step_mean']:.2f} of "
                                     f"{summary['timesteps']} (mean)"),
            ("neuron updates / sample", count(summary["neuron_updates_per_sample"]))]
    if energy.get("loihi1_j") is not None:
        rows.append(("energy / sample (Loihi 1)", si(energy["loihi1_j"], "J")))
    if energy.get("loihi2_j") is not None:
        rows.append(("energy / sample (Loihi 2)", si(energy["loihi2_j"], "J")))
    if summary["spike_mismatches"] and summary["pipeline_delay_steps"] > 0 and summary["compare"] != summary["target"]:
        rows.append(("note", "a fixed-point chip target and a float reference are expected to differ a little: "
                             "quantisation flips neurons near their threshold"))
    rows += [(f"  spikes {name}", count(value)) for name, value in summary["spikes_per_layer"].items()]
    return rows
