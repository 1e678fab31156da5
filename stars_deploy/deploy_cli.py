"""``stars-deploy export`` and ``stars-deploy simulate``: parse options, call one library function."""

from __future__ import annotations

from pathlib import Path

import click

from .cli import emit, json_option, percent, quiet_option
from .progress import set_quiet


def _run_dir(run_dir: Path | None, runs_dir: Path) -> Path:
    from .runs import latest_run

    return run_dir if run_dir is not None else latest_run(runs_dir)


def _table(header: tuple, rows: list[tuple]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        click.echo("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip())


def _print_loihi(payload: dict) -> None:
    click.echo("quantisation (per layer; scale = 2^exponent mantissa units per unit of v):")
    _table(("layer", "kind", "exp", "vThMant", "vDecay", "clipped", "w rms rel err", "w max err", "bias max err"),
           [(r["layer"], r["kind"], r["exponent"], r["threshold_mant"], r["v_decay"], r.get("weights_clipped", "-"),
             f"{r['weight_rms_relative_error']:.4f}" if "weight_rms_relative_error" in r else "off-chip input",
             f"{r['weight_max_abs_error']:.2e}" if "weight_max_abs_error" in r else "",
             f"{r['bias_max_abs_error']:.2e}" if "bias_max_abs_error" in r else f"step {r['bias_resolution']:.2e}")
            for r in payload["quantization"]])
    click.echo("netx layers:")
    _table(("#", "type", "shape", "kernel/stride", "iDecay", "vDecay", "vThMant", "spikes"),
           [(r["index"], ("flatten+" if r["flatten_before"] else "") + r["type"], "x".join(map(str, r["shape"])),
             f"{r['kernel']}/{r['stride']}" if "kernel" in r else "", r["iDecay"], r["vDecay"], r["vThMant"],
             r["spike_name"] or "(readout: u)") for r in payload["netx_layers"]])
    click.echo(f"pipeline delay: {payload['pipeline_delay_steps']} steps (latency T + delay = "
               f"{payload['timesteps'] + payload['pipeline_delay_steps']} steps)")


@click.command()
@click.argument("run_dir", required=False, type=click.Path(path_type=Path, exists=True))
@click.option("--target", type=click.Choice(["nir", "onnx", "loihi"]), default="nir", show_default=True)
@click.option("--teacher", "with_teacher", is_flag=True, help="ONNX only: export the teacher too.")
@click.option("--dt-s", type=float, default=None, help="Loihi: integration step in seconds, for .nir files without dt_s.")
@click.option("--timesteps", "-T", type=int, default=None, help="Loihi: steps per sample, for .nir files without it.")
@click.option("--runs-dir", type=click.Path(path_type=Path), default=Path("runs"), show_default=True,
              help="Where to find the latest run when RUN_DIR is not given.")
@json_option
@quiet_option
def export(run_dir, target, with_teacher, dt_s, timesteps, runs_dir, as_json, quiet):
    """Export a run's student (default: the latest run) to RUN_DIR/export/ and print its layers.

    With --target loihi, RUN_DIR may also be any .nir file (written beside it as FILE.net)."""
    from stars_deploy.exporters.run_export import export_run

    set_quiet(quiet)
    if run_dir is not None and run_dir.is_file() and target != "loihi":
        raise click.UsageError(f"--target {target} exports a run directory; only --target loihi takes a .nir file")
    payload = export_run(_run_dir(run_dir, runs_dir), target, teacher=with_teacher, dt_s=dt_s, timesteps=timesteps)
    if as_json:
        emit(payload, True, [])
        return
    header = ("layer", "type", "input", "output", "params", "kernel/stride")
    rows = [(row["name"], row["type"], "x".join(map(str, row["input_shape"] or [])),
             "x".join(map(str, row["output_shape"] or [])), f"{row['parameters']:,}",
             f"{row['kernel']}/{row['stride']}" if "kernel" in row else "") for row in payload["layers"]]
    _table(header, rows)
    if target == "loihi":
        _print_loihi(payload)
    for name, info in payload["files"].items():
        click.echo(f"{name}: {info['bytes']:,} bytes, sha256 {info['sha256'][:16]}...")
    where = Path(payload["run_dir"]) / "export" if "run_dir" in payload else Path(payload["source"]).parent
    click.echo(f"parameters: {payload['parameters']:,}; written to {where}")


@click.command()
@click.argument("path", required=False, type=click.Path(path_type=Path, exists=True))
@click.option("--target", type=click.Choice(["nir", "loihi", "lava"]), default="nir", show_default=True,
              help="nir: float reference; loihi: bit-accurate emulator; lava: Lava's fixed-point simulator.")
@click.option("--data", default="digits", show_default=True, help="digits, a .npz file or a CIFAR folder.")
@click.option("--samples", type=int, default=None, help="Only the first N images.")
@click.option("--compare", default=None,
              help="student (the run's folded student), nir, loihi, lava, or none [student inside a run, else none].")
@click.option("--dt-s", type=float, default=None, help="Integration step in seconds, for files without dt_s metadata.")
@click.option("--timesteps", "-T", type=int, default=None, help="Steps per sample, for files without metadata.")
@click.option("--device", default="cpu", show_default=True)
@click.option("--loihi2-pj-per-op", type=float, default=None,
              help="Energy per synaptic op or neuron update on Loihi 2, in pJ (no primary figure is published).")
@click.option("--runs-dir", type=click.Path(path_type=Path), default=Path("runs"), show_default=True)
@json_option
@quiet_option
def simulate(path, target, data, samples, compare, dt_s, timesteps, device, loihi2_pj_per_op, runs_dir, as_json,
             quiet):
    """Run an exported file (PATH: a .nir/.net file or a run directory; default: the latest run)."""
    from stars_deploy.targets.simulate import simulate as run_simulation

    set_quiet(quiet)
    if samples is not None and samples < 1:
        raise click.UsageError("--samples must be at least 1")
    path = path if path is not None else _run_dir(None, runs_dir)
    summary = run_simulation(path, target, data, samples, compare, dt_s=dt_s, timesteps=timesteps, device=device,
                             loihi2_pj_per_op=loihi2_pj_per_op)
    rows = [("target", summary["target"]), ("samples", str(summary["samples"])),
            ("accuracy", percent(summary["accuracy"])),
            (f"{summary['compare']} accuracy", percent(summary["reference_accuracy"])),
            ("agreement", percent(summary["agreement"])),
            ("spike mismatches", "n/a" if summary["spike_mismatches"] is None else str(summary["spike_mismatches"])),
            ("spikes / sample", f"{summary['spikes_per_sample']:.1f}"),
            ("synops / sample", f"{summary['synops_per_sample']:,.0f}"),
            ("latency", f"{summary['latency_steps']} steps (pipeline delay {summary['pipeline_delay_steps']})"),
            ("stable decision", f"step {summary['stable_decision_step_mean']:.2f} on average"),
            ("neuron updates / sample", f"{summary['neuron_updates_per_sample']:,.0f}"),
            ("energy / sample (Loihi 1)", f"{summary['energy_per_sample']['loihi1_j'] * 1e9:.2f} nJ")]
    if summary["energy_per_sample"]["loihi2_j"] is not None:
        rows.append(("energy / sample (Loihi 2)", f"{summary['energy_per_sample']['loihi2_j'] * 1e9:.2f} nJ"))
    rows += [(f"  spikes {name}", f"{value:.1f}") for name, value in summary["spikes_per_layer"].items()]
    emit(summary, as_json, rows)
