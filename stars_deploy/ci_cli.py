"""``stars-deploy check``, ``report`` and ``pipeline``: the CI commands. Exit codes: 0 every gate
passed, 1 a gate failed, 2 a usage or input error."""

from __future__ import annotations

from pathlib import Path

import click

from .cli import emit, json_option, quiet_option
from .deploy_cli import _run_dir, _table
from .progress import set_quiet

GATE_FAILED = 1


def _format(value) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float) and not value.is_integer():
        return f"{value:.6g}"
    return f"{value:,.0f}" if isinstance(value, (int, float)) else str(value)


def print_gates(result: dict) -> None:
    rows = [(row["gate"], _format(row["measured"]), f"{row['comparison']} {_format(row['limit'])}",
             "pass" if row["passed"] else f"FAIL{' (' + row['note'] + ')' if row['note'] else ''}")
            for row in result["gates"]]
    _table(("gate", "measured", "limit", "result"), rows)
    source = "reused " + Path(result["run_dir"], f"simulate-{result['target']}.json").name if result["reused"] else "simulated"
    click.echo(f"{result['target']} on {result['data']} ({result['samples']} samples, {source}): "
               f"{'all gates passed' if result['passed'] else 'GATE FAILED'}")


def gate_options(function):
    """The gate limits as options (None: not given, so the config file's limit or no gate)."""
    from stars_deploy.targets.gates import GATES

    for gate in reversed(list(GATES.values())):
        option = "--" + gate.name.replace("_", "-")
        function = click.option(option, gate.name, type=gate.kind, default=None,
                                help=f"{'Lowest' if gate.minimum else 'Highest'} allowed {gate.description}.")(function)
    return function


@click.command()
@click.argument("run_dir", required=False, type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--target", type=click.Choice(["loihi", "lava", "nir"]), default=None,
              help="Target to gate [the config's, else loihi].")
@gate_options
@click.option("--data", default=None, help="digits, a .npz file or a CIFAR folder [the run's evaluation data].")
@click.option("--samples", type=int, default=None, help="Only the first N images.")
@click.option("--config", "config", type=click.Path(path_type=Path), default=None,
              help="A stars-deploy.toml or pyproject.toml [./stars-deploy.toml, else ./pyproject.toml].")
@click.option("--rerun", is_flag=True, help="Simulate again even when a stored result matches the exported file.")
@click.option("--junit-xml", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Also write the gates as a JUnit XML report here.")
@click.option("--device", default="cpu", show_default=True)
@click.option("--runs-dir", type=click.Path(path_type=Path), default=Path("runs"), show_default=True)
@json_option
@quiet_option
@click.pass_context
def check(ctx, run_dir, target, data, samples, config, rerun, junit_xml, device, runs_dir, as_json, quiet, **limits):
    """Gate a run's exported student on a target (default: the latest run). Exit 0 when every
    gate passes, 1 when one fails, 2 on a usage or input error."""
    from stars_deploy.targets.check import check as run_check
    from stars_deploy.targets.gates import write_junit_xml

    set_quiet(quiet)
    result = run_check(_run_dir(run_dir, runs_dir), target, limits, data, samples, config, rerun, device)
    if junit_xml is not None:
        write_junit_xml(junit_xml, result["gates"], f"stars-deploy check {result['target']}")
    if as_json:
        emit(result, True, [])
    else:
        print_gates(result)
    if not result["passed"]:
        ctx.exit(GATE_FAILED)


@click.command()
@click.argument("run_dir", required=False, type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--data", default=None, help="For targets not simulated yet [the run's evaluation data].")
@click.option("--samples", type=int, default=None, help="Only the first N images, for targets not simulated yet.")
@click.option("--device", default="cpu", show_default=True)
@click.option("--runs-dir", type=click.Path(path_type=Path), default=Path("runs"), show_default=True)
@json_option
@quiet_option
def report(run_dir, data, samples, device, runs_dir, as_json, quiet):
    """Write RUN_DIR/report.html (self-contained, PNG plots) and RUN_DIR/plots/ (default: the latest run)."""
    from stars_deploy.targets.report import write_report

    set_quiet(quiet)
    if samples is not None and samples < 1:
        raise click.UsageError("--samples must be at least 1")
    payload = write_report(_run_dir(run_dir, runs_dir), data, samples, device)
    emit(payload, as_json, [("report", payload["report"]), ("plots", ", ".join(payload["plots"]) or "none"),
                            ("targets", ", ".join(payload["targets"]) or "none")])


@click.command()
@click.argument("config", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--device", default="cpu", show_default=True, help="For the simulations (distill has its own).")
@json_option
@quiet_option
@click.pass_context
def pipeline(ctx, config, device, as_json, quiet):
    """Distill -> export -> simulate and check -> report, as CONFIG (TOML) says. Exit 0 when every
    gate passes, 1 when one fails, 2 on a usage or input error."""
    from .pipeline import run_pipeline

    set_quiet(quiet)
    result = run_pipeline(config, device)
    if as_json:
        emit(result, True, [])
    else:
        distilled = result["distill"]
        click.echo(f"run {result['run_dir']}: student {distilled.get('student_accuracy', float('nan')):.1%}, "
                   f"{distilled['rounds']} rounds; exported {', '.join(result['exports']) or 'nothing'}")
        for outcome in result["checks"].values():
            print_gates(outcome)
        if "report" in result:
            click.echo(f"report: {result['report']}")
    if not result["passed"]:
        ctx.exit(GATE_FAILED)
