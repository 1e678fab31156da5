"""``stars-deploy distill``: options from the library's schema (distillation/options.py)."""

from __future__ import annotations

from pathlib import Path

import click

from stars_deploy.distillation.options import DISTILL_OPTIONS
from stars_deploy.units import percent

from .common import TopicCommand, emit, option, output_options, quiet_if, schema_options


@click.command(cls=TopicCommand)
@schema_options(DISTILL_OPTIONS)
@option("--resume", type=click.Path(path_type=Path), default=None, topic="Run directory", show_default=False,
        help="Continue the run in this directory from its last checkpoint (other options ignored).")
@output_options
def distill(runs_dir, run_name, resume, as_json, quiet, **options):
    """Distil a spiking student from a teacher alone. With no options: the embedded default
    (digits teacher -> spiking convnet -> evaluation on held-out digits). Under
    `torchrun --nproc-per-node N -m stars_deploy distill ...` the N processes distil together
    and rank 0 alone writes the run and prints the result."""
    from stars_deploy.distillation import distill as run_distill
    from stars_deploy.distillation.distributed import launch_rank
    from stars_deploy.distillation.options import check_run_options, config_from_options

    quiet_if(quiet)
    config = None if resume is not None else config_from_options(options)
    if resume is None:
        check_run_options(runs_dir, run_name)
    summary = run_distill(config, runs_dir=runs_dir, run_name=run_name, resume=resume)
    if launch_rank() != 0:
        return
    emit(summary, as_json, [
        ("teacher accuracy", percent(summary.get("teacher_accuracy"))),
        ("student accuracy", percent(summary.get("student_accuracy"))),
        ("agreement", percent(summary.get("agreement"))),
        ("synthetic images", f"{summary['synthetic_images']:,}"),
        ("rounds", str(summary["rounds"])),
        ("wall time", f"{summary['wall_time_s']:.1f} s"),
        ("run directory", summary["run_dir"]),
    ])
