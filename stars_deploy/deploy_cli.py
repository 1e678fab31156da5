"""``stars-deploy export`` and ``stars-deploy simulate``: parse options, call one library function."""

from __future__ import annotations

from pathlib import Path

import click

from .cli import emit, json_option, percent, quiet_option
from .progress import set_quiet


def _run_dir(run_dir: Path | None, runs_dir: Path) -> Path:
    from .runs import latest_run

    return run_dir if run_dir is not None else latest_run(runs_dir)


@click.command()
@click.argument("run_dir", required=False, type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--target", type=click.Choice(["nir", "onnx"]), default="nir", show_default=True)
@click.option("--teacher", "with_teacher", is_flag=True, help="ONNX only: export the teacher too.")
@click.option("--runs-dir", type=click.Path(path_type=Path), default=Path("runs"), show_default=True,
              help="Where to find the latest run when RUN_DIR is not given.")
@json_option
@quiet_option
def export(run_dir, target, with_teacher, runs_dir, as_json, quiet):
    """Export a run's student (default: the latest run) to RUN_DIR/export/ and print its layers."""
    from stars_deploy.exporters.run_export import export_run

    set_quiet(quiet)
    payload = export_run(_run_dir(run_dir, runs_dir), target, teacher=with_teacher)
    if as_json:
        emit(payload, True, [])
        return
    header = ("layer", "type", "input", "output", "params", "kernel/stride")
    rows = [(row["name"], row["type"], "x".join(map(str, row["input_shape"] or [])),
             "x".join(map(str, row["output_shape"] or [])), f"{row['parameters']:,}",
             f"{row['kernel']}/{row['stride']}" if "kernel" in row else "") for row in payload["layers"]]
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        click.echo("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip())
    for name, info in payload["files"].items():
        click.echo(f"{name}: {info['bytes']:,} bytes, sha256 {info['sha256'][:16]}...")
    click.echo(f"parameters: {payload['parameters']:,}; written to {Path(payload['run_dir']) / 'export'}")


@click.command()
@click.argument("path", required=False, type=click.Path(path_type=Path, exists=True))
@click.option("--target", type=click.Choice(["nir"]), default="nir", show_default=True)
@click.option("--data", default="digits", show_default=True, help="digits, a .npz file or a CIFAR folder.")
@click.option("--samples", type=int, default=None, help="Only the first N images.")
@click.option("--compare", default=None,
              help="student (the run's folded student), nir, or none [student inside a run, else none].")
@click.option("--dt-s", type=float, default=None, help="Integration step in seconds, for files without dt_s metadata.")
@click.option("--timesteps", "-T", type=int, default=None, help="Steps per sample, for files without metadata.")
@click.option("--device", default="cpu", show_default=True)
@click.option("--runs-dir", type=click.Path(path_type=Path), default=Path("runs"), show_default=True)
@json_option
@quiet_option
def simulate(path, target, data, samples, compare, dt_s, timesteps, device, runs_dir, as_json, quiet):
    """Run an exported file (PATH: a .nir file or a run directory; default: the latest run)."""
    from stars_deploy.targets.simulate import simulate_nir

    set_quiet(quiet)
    if samples is not None and samples < 1:
        raise click.UsageError("--samples must be at least 1")
    path = path if path is not None else _run_dir(None, runs_dir)
    summary = simulate_nir(path, data, samples, compare, dt_s=dt_s, timesteps=timesteps, device=device)
    rows = [("target", summary["target"]), ("samples", str(summary["samples"])),
            ("accuracy", percent(summary["accuracy"])),
            (f"{summary['compare']} accuracy", percent(summary["reference_accuracy"])),
            ("agreement", percent(summary["agreement"])),
            ("spike mismatches", "n/a" if summary["spike_mismatches"] is None else str(summary["spike_mismatches"])),
            ("spikes / sample", f"{summary['spikes_per_sample']:.1f}"),
            ("synops / sample", f"{summary['synops_per_sample']:,.0f}"),
            ("latency", f"{summary['latency_steps']} steps (pipeline delay {summary['pipeline_delay_steps']})"),
            ("stable decision", f"step {summary['stable_decision_step_mean']:.2f} on average")]
    rows += [(f"  spikes {name}", f"{value:.1f}") for name, value in summary["spikes_per_layer"].items()]
    emit(summary, as_json, rows)
