"""``stars-deploy check``, ``report`` and ``pipeline``: the CI commands. Exit codes: 0 every gate
passed, 1 a gate failed, 2 a usage or input error."""

from __future__ import annotations

from pathlib import Path

import click

from stars_deploy.targets.gates import GATES, GATE_FAILED
from stars_deploy.targets.registry import target_names
from stars_deploy.targets.report import FORMATS
from stars_deploy.units import count, percent

from .common import (FiniteFloatRange, LazyChoice, TopicCommand, device_option, emit, inside_working_directory,
                     option, output_options, quiet_if, run_dir_or_latest, runs_dir_option, table)


def _format(value, gate) -> str:
    """A measured value or limit as people read it: shares as percentages, counts with separators."""
    if value is None:
        return "n/a"
    if gate is not None and gate.fraction:
        return percent(value, 2)
    return count(value) if isinstance(value, (int, float)) else str(value)


def print_gates(result: dict) -> None:
    rows = []
    for row in result["gates"]:
        gate = GATES.get(row["gate"].replace("-", "_"))
        rows.append((row["gate"], _format(row["measured"], gate), f"{row['comparison']} {_format(row['limit'], gate)}",
                     "pass" if row["passed"] else f"FAIL{' (' + row['note'] + ')' if row['note'] else ''}"))
    if rows:
        table(("gate", "measured", "limit", "result"), rows)
    else:  # no gates: what each gate would measure, to choose limits from
        by_metric = {gate.metric: gate for gate in GATES.values()}
        table(("measured", "value"), [(name.replace("_", "-"), _format(value, by_metric.get(name)))
                                      for name, value in result["measured"].items()])
    source = "reused " + Path(result["result_file"]).name if result["reused"] else "simulated"
    verdict = ("all gates passed" if result["passed"] else "GATE FAILED") if rows else "no gates given, measured only"
    click.echo(f"{result['target']} on {result['data']} ({result['samples']} samples, {source}): {verdict}")


def gate_options(function):
    """The gate limits as options (None: not given, so the config file's limit or no gate),
    with their ranges checked by click (a fraction outside 0..1, or NaN, is a usage error)."""
    for gate in reversed(list(GATES.values())):
        flag = "--" + gate.name.replace("_", "-")
        kind = FiniteFloatRange(gate.low, gate.high) if gate.kind is float else click.IntRange(gate.low, gate.high)
        function = option(flag, gate.name, type=kind, default=None, topic="Gates", show_default="no gate",
                          help=f"{'Lowest' if gate.minimum else 'Highest'} allowed {gate.description}.")(function)
    return function


@click.command(cls=TopicCommand)
@click.argument("run_dir", required=False, type=click.Path(path_type=Path, exists=True, file_okay=False))
@option("--target", type=LazyChoice(target_names), default=None, topic="Target",
        show_default="the config's, else loihi (nir for a converted teacher)", help="Target to gate.")
@gate_options
@option("--data", default=None, topic="Evaluation", show_default="the run's evaluation data",
        help="digits, a .npz file or a CIFAR folder.")
@option("--samples", type=click.IntRange(min=1), default=None, topic="Evaluation", show_default="all",
        help="Only the first N images.")
@option("--config", "config", type=click.Path(path_type=Path, dir_okay=False), default=None, topic="Gates",
        show_default="./stars-deploy.toml, else ./pyproject.toml", help="A stars-deploy.toml or pyproject.toml.")
@option("--rerun", is_flag=True, topic="Evaluation", show_default=False,
        help="Simulate again even when a stored result matches the exported file.")
@option("--junit-xml", type=click.Path(path_type=Path, dir_okay=False), default=None, topic="Output",
        show_default="none", help="Also write the gates as a JUnit XML report here.")
@device_option()
@runs_dir_option
@output_options
@click.pass_context
def check(ctx, run_dir, target, data, samples, config, rerun, junit_xml, device, runs_dir, as_json, quiet, **limits):
    """Gate a run's exported student on a target (default: the latest run). Exit 0 when every
    gate passes, 1 when one fails, 2 on a usage or input error."""
    from stars_deploy import api
    from stars_deploy.devices import resolve_device
    from stars_deploy.targets.gates import write_junit_xml

    quiet_if(quiet)
    if junit_xml is not None:
        junit_xml = inside_working_directory(junit_xml, "--junit-xml")
    resolve_device(device)  # before any work, also when a stored result is reused
    result = api.check(run_dir_or_latest(run_dir, runs_dir), target, data=data, samples=samples, config=config,
                       rerun=rerun, device=device, **limits)
    if junit_xml is not None:
        write_junit_xml(junit_xml, result["gates"], f"stars-deploy check {result['target']}")
    if as_json:
        emit(result, True, [])
    else:
        print_gates(result)
    if not result["passed"]:
        ctx.exit(GATE_FAILED)


@click.command(cls=TopicCommand)
@click.argument("run_dir", required=False, type=click.Path(path_type=Path, exists=True, file_okay=False))
@option("--data", default=None, topic="Evaluation", show_default="the run's evaluation data",
        help="For targets not simulated yet: digits, a .npz file or a CIFAR folder.")
@option("--samples", type=click.IntRange(min=1), default=None, topic="Evaluation", show_default="all",
        help="Only the first N images, for targets not simulated yet.")
@option("--format", "report_format", type=click.Choice(FORMATS), default="html", topic="Output",
        help="html: RUN_DIR/report.html with plots; md: RUN_DIR/report.md, a short summary for a pull-request "
             "comment, also printed on stdout.")
@device_option()
@runs_dir_option
@output_options
def report(run_dir, data, samples, report_format, device, runs_dir, as_json, quiet):
    """Write RUN_DIR/report.html (self-contained, plots as PNG and SVG under RUN_DIR/plots/), or with
    --format md a Markdown summary (default: the latest run)."""
    from stars_deploy import api
    from stars_deploy.devices import resolve_device

    quiet_if(quiet)
    resolve_device(device)  # before any work, also when every target's result is stored
    payload = api.report(run_dir_or_latest(run_dir, runs_dir), data=data, samples=samples, device=device,
                         format=report_format)
    if report_format == "md" and not as_json:
        click.echo(payload["markdown"], nl=False)
        return
    emit(payload, as_json, [("report", payload["report"]), ("plots", ", ".join(payload["plots"]) or "none"),
                            ("targets", ", ".join(payload["targets"]) or "none")])


@click.command(cls=TopicCommand)
@click.argument("config", type=click.Path(path_type=Path, dir_okay=False))
@device_option("For the simulations (distill has its own).")
@output_options
@click.pass_context
def pipeline(ctx, config, device, as_json, quiet):
    """Distill -> export -> simulate and check -> report, as CONFIG (TOML) says. Exit 0 when every
    gate passes, 1 when one fails, 2 on a usage or input error."""
    from stars_deploy.pipeline import run_pipeline

    quiet_if(quiet)
    result = run_pipeline(config, device)
    if as_json:
        emit(result, True, [])
    else:
        distilled = result["distill"]
        click.echo(f"run {result['run_dir']}: student {percent(distilled.get('student_accuracy'))}, "
                   f"{distilled['rounds']} rounds; exported {', '.join(result['exports']) or 'nothing'}")
        for outcome in result["checks"].values():
            print_gates(outcome)
        if "report" in result:
            click.echo(f"report: {result['report']}")
    if not result["passed"]:
        ctx.exit(GATE_FAILED)
