"""``stars-deploy convert``: the teacher itself as a spiking network (convert.py)."""

from __future__ import annotations

from pathlib import Path

import click

from stars_deploy.conversion import DEFAULT_PERCENTILE
from stars_deploy.converter import DEFAULT_CALIBRATION_IMAGES, DEFAULT_DT_S, DEFAULT_TIMESTEPS
from stars_deploy.distillation.options import TEACHER_OPTIONS
from stars_deploy.units import count, percent

from .common import POSITIVE_FLOAT, TopicCommand, device_option, emit, option, output_options, quiet_if, schema_options


@click.command(cls=TopicCommand)
@schema_options(TEACHER_OPTIONS)
@option("--timesteps", "-T", type=click.IntRange(min=1), default=DEFAULT_TIMESTEPS, topic="Conversion",
        help="Steps per sample (the converted network's rates resolve 1/T of a threshold).")
@option("--calibration-images", type=click.IntRange(min=1), default=DEFAULT_CALIBRATION_IMAGES, topic="Conversion",
        help="Synthetic images the thresholds are taken on.")
@option("--percentile", type=click.FloatRange(min=0, max=100, min_open=True), default=DEFAULT_PERCENTILE,
        topic="Conversion", help="Each threshold: this percentile of the ReLU's positive activations.")
@option("--calibrate-on", type=click.Path(path_type=Path, file_okay=False, exists=True), default=None,
        topic="Conversion", show_default="images synthesised now",
        help="A distill run of the same teacher: calibrate on its synthetic pool instead.")
@option("--dt-s", type=POSITIVE_FLOAT, default=DEFAULT_DT_S, topic="Conversion", help="Integration step in seconds (NIR).")
@option("--seed", type=int, default=0, topic="Conversion", help="Random seed of the synthesis.")
@option("--data", "eval_data", default=None, topic="Evaluation", show_default="none",
        help="digits, a .npz file or a CIFAR folder: simulate the NIR file on it at the end (and by default later).")
@option("--samples", type=click.IntRange(min=1), default=None, topic="Evaluation", show_default="all",
        help="Only the first N images of --data.")
@option("--runs-dir", type=click.Path(path_type=Path), default=Path("runs"), topic="Run directory",
        help="Where the run directory is made.")
@option("--name", "run_name", default=None, topic="Run directory", show_default="TEACHER-converted-T<T>-<time>",
        help="The run directory's name.")
@device_option()
@output_options
def convert(arch, weights, normalization, num_classes, input_shape, no_hflip, timesteps, calibration_images,
            percentile, calibrate_on, dt_s, seed, eval_data, samples, runs_dir, run_name, device, as_json, quiet):
    """Convert the teacher itself into a spiking network, data-free: every ReLU becomes an
    integrate-and-fire neuron (reset by subtraction) whose threshold comes from synthetic
    images. Writes a run directory whose export/student.nir `simulate --target nir` runs."""
    from stars_deploy.converter import convert as run_convert
    from stars_deploy.distillation.options import teacher_spec

    quiet_if(quiet)
    spec = teacher_spec(arch, weights, normalization, num_classes, input_shape, no_hflip)
    summary = run_convert(spec, timesteps=timesteps, calibration_images=calibration_images, percentile=percentile,
                          calibrate_on=calibrate_on, eval_data=eval_data, samples=samples, runs_dir=runs_dir,
                          run_name=run_name, device=device, seed=seed, dt_s=dt_s)
    rows = [("teacher", spec.arch), ("spiking sites", f"{summary['sites']} ReLUs -> integrate-and-fire"),
            ("timesteps", str(timesteps)),
            ("calibration", f"{summary['calibration']['images']:,} images ({summary['calibration']['source']})")]
    if "accuracy" in summary:
        rows += [("accuracy (NIR reference)", f"{percent(summary['accuracy'])} on {summary['samples']:,} images"),
                 ("spikes / sample", count(summary["spikes_per_sample"]))]
    rows += [("wall time", f"{summary['wall_time_s']:.1f} s"), ("NIR file", summary["file"]),
             ("run directory", summary["run_dir"])]
    emit(summary, as_json, rows)
