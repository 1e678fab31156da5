"""``stars-deploy teacher train|eval|list``."""

from __future__ import annotations

from pathlib import Path

import click

from stars_deploy.distillation.options import TEACHER_OPTIONS
from stars_deploy.units import percent

from .common import TopicCommand, device_option, emit, option, output_options, quiet_if, schema_options


@click.group()
def teacher():
    """Train the digits teacher, evaluate or list teachers."""


@teacher.command("train", cls=TopicCommand)
@option("--out", type=click.Path(path_type=Path, dir_okay=False), default=None,
        show_default="the cache: $STARS_DEPLOY_CACHE, else $XDG_CACHE_HOME/stars-deploy, else ~/.cache/stars-deploy",
        help="Where to save the checkpoint (a file).")
@option("--epochs", type=click.IntRange(min=1), default=40, help="Training epochs.")
@option("--seed", type=int, default=0, help="Random seed.")
@output_options
def teacher_train(out, epochs, seed, as_json, quiet):
    """Train the digits BatchNorm CNN (seconds on a CPU) and cache it for `distill`."""
    from stars_deploy.teachers.training import train_digits_teacher

    quiet_if(quiet)
    summary = train_digits_teacher(out, epochs=epochs, seed=seed)
    emit(summary, as_json, [("test accuracy", percent(summary["test_accuracy"])),
                            ("wall time", f"{summary['wall_time_s']:.1f} s"), ("saved to", summary["path"])])


@teacher.command("eval", cls=TopicCommand)
@schema_options(TEACHER_OPTIONS)
@option("--data", default="digits", topic="Evaluation", help="digits, a .npz file or a CIFAR folder.")
@option("--samples", type=click.IntRange(min=1), default=None, topic="Evaluation", show_default="all",
        help="Only the first N images.")
@device_option()
@output_options
def teacher_eval(arch, weights, normalization, num_classes, input_shape, no_hflip, data, samples, device, as_json,
                 quiet):
    """Accuracy of a teacher on a data set."""
    from stars_deploy.distillation.options import teacher_spec
    from stars_deploy.teachers.evaluate import evaluate_teacher

    quiet_if(quiet)
    spec = teacher_spec(arch, weights, normalization, num_classes, input_shape, no_hflip)
    summary = evaluate_teacher(spec, data, samples, device)
    emit(summary, as_json, [("teacher", summary["teacher"]), ("data", summary["data"]),
                            ("images", str(summary["images"])), ("accuracy", percent(summary["accuracy"]))])


@teacher.command("list", cls=TopicCommand)
@output_options
def teacher_list(as_json, quiet):
    """The registered teacher architectures."""
    from stars_deploy.teachers import ARCHITECTURES

    payload = {name: {"input_shape": list(a.input_shape), "normalization": a.normalization}
               for name, a in ARCHITECTURES.items()}
    emit({"architectures": payload}, as_json,
         [(name, f"input {tuple(v['input_shape'])}, normalisation {v['normalization']}") for name, v in payload.items()])
