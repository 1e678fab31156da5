"""The Python API: what each ``stars-deploy`` command does, as a function (the CLI calls these).

    import stars_deploy as sd

    run = sd.distill(my_model, input_shape=(3, 32, 32), normalization="imagenet", num_classes=10,
                     data="test.npz", budget_s=600)          # any nn.Module with BatchNorm layers
    spiking = sd.convert(my_model, input_shape=(3, 32, 32), normalization="imagenet", timesteps=32)
    sd.export(run["run_dir"], "loihi")
    result = sd.simulate(run["run_dir"], "loihi", samples=200)
    gates = sd.check(run["run_dir"], "loihi", min_accuracy=0.5, max_accuracy_drop=0.02)
    sd.report(run["run_dir"])
    student = sd.load_student(run["run_dir"])               # a Norse module, eval mode
    teacher = sd.load_teacher(run["run_dir"])               # the run's teacher, frozen

Every function returns what its command prints with ``--json`` (a dict), raises a
StarsDeployError subclass with a one-line message for anything the caller can fix, and
takes the command's options by their Python names (``budget_s`` for ``--budget-s``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from .errors import ConfigError
from .layout import STUDENT


def _distill_options(options: dict[str, Any]) -> dict[str, Any]:
    """``options`` checked against the distill option schema (names and types)."""
    from .distillation.options import DISTILL_OPTIONS, check_value, defaults

    by_name = {option.name: option for option in DISTILL_OPTIONS}
    aliases = {"data": "eval_data", "student": "family", "name": "run_name", "synthesizer": "method"}
    values = defaults()
    for key, value in options.items():
        name = aliases.get(key, key)
        if name not in by_name:
            raise ConfigError(f"distill(): unknown option {key!r}; options are the names of "
                              f"`stars-deploy distill --help` with underscores ({', '.join(sorted(by_name))})")
        option = by_name[name]
        if value is not None or option.default is None:
            values[name] = value if value is None else check_value(option, value, "distill()")
    return values


def _teacher_spec(caller: str, teacher: str | nn.Module, weights, input_shape, normalization: str,
                  num_classes: int, class_names=None, hflip: bool | None = None):
    """The TeacherSpec of the API's teacher arguments: a module (held for this process) or
    what the command line's --teacher takes."""
    from dataclasses import replace

    from .distillation.options import teacher_spec
    from .teachers import TeacherSpec
    from .teachers.sources import MODULE, hold_module

    if isinstance(teacher, nn.Module):
        if input_shape is None:
            raise ConfigError(f"{caller}(teacher=module): give input_shape=(C, H, W)")
        spec = TeacherSpec(arch=MODULE, factory=hold_module(teacher), weights=str(weights) if weights else None,
                           normalization=normalization, num_classes=num_classes, shape=tuple(input_shape),
                           hflip=hflip, class_names=tuple(class_names or ()))
        spec.mean_std  # validates the normalisation against the channels
        return spec
    shape = ",".join(str(s) for s in input_shape) if input_shape else None
    spec = teacher_spec(str(teacher), Path(weights) if weights else None, normalization, num_classes, shape,
                        no_hflip=hflip is False)
    return replace(spec, class_names=tuple(class_names or ()))


def distill(teacher: str | nn.Module = "digits_cnn", *, weights: str | Path | None = None,
            input_shape: tuple[int, int, int] | None = None, normalization: str = "", num_classes: int = 10,
            class_names: list[str] | None = None, hflip: bool | None = None, runs_dir: str | Path = "runs",
            name: str | None = None, resume: str | Path | None = None, **options) -> dict:
    """Distil a spiking student from ``teacher`` alone and return the run's summary.

    ``teacher``: a named architecture (``cifar_resnet20``, ...), ``"package.module:function"``,
    a ``.pt2`` torch.export file, or an ``nn.Module`` with BatchNorm2d layers (then give
    ``input_shape`` (C, H, W) and ``num_classes``; it is held for this process, so resuming
    the run later needs it again). ``options``: every ``stars-deploy distill`` option by its
    Python name, e.g. ``budget_s=600, family="convnet", timesteps=4, data="test.npz"``.
    ``resume``: continue that run directory (the other arguments are ignored)."""
    from .distillation import distill as run_distill
    from .distillation.options import config_from_options

    if resume is not None:
        return run_distill(None, runs_dir=Path(runs_dir), resume=Path(resume))
    values = _distill_options(options)
    spec = _teacher_spec("distill", teacher, weights, input_shape, normalization, num_classes, class_names, hflip)
    config = config_from_options(values, teacher=spec)
    return run_distill(config, runs_dir=Path(runs_dir), run_name=name)


def convert(teacher: str | nn.Module = "digits_cnn", *, weights: str | Path | None = None,
            input_shape: tuple[int, int, int] | None = None, normalization: str = "", num_classes: int = 10,
            class_names: list[str] | None = None, data: str | None = None, runs_dir: str | Path = "runs",
            name: str | None = None, calibrate_on: str | Path | None = None, **options) -> dict:
    """Convert ``teacher`` itself into a spiking network in a new run directory (what
    ``stars-deploy convert --json`` prints): the teacher arguments as for :func:`distill`;
    ``data``: simulate the NIR file on it at the end; ``options``: ``timesteps``,
    ``calibration_images``, ``percentile``, ``samples``, ``device``, ``seed``, ``dt_s``."""
    from .converter import CONVERT_OPTIONS, convert as run_convert

    unknown = sorted(set(options) - set(CONVERT_OPTIONS))
    if unknown:
        raise ConfigError(f"convert(): unknown option {unknown[0]!r}; options are {', '.join(CONVERT_OPTIONS)}")
    spec = _teacher_spec("convert", teacher, weights, input_shape, normalization, num_classes, class_names)
    return run_convert(spec, eval_data=data, runs_dir=Path(runs_dir), run_name=name,
                       calibrate_on=Path(calibrate_on) if calibrate_on is not None else None, **options)


def export(run_dir: str | Path, target: str = "nir", *, teacher: bool = False, dt_s: float | None = None,
           timesteps: int | None = None) -> dict:
    """Export the run's student (``nir``, ``loihi``, ``onnx``; ``loihi`` also takes a .nir
    file) into RUN_DIR/export/; returns the export record."""
    from .exporters.registry import export_run

    return export_run(Path(run_dir), target, teacher=teacher, dt_s=dt_s, timesteps=timesteps)


def simulate(path: str | Path, target: str = "nir", *, data: str | None = None, samples: int | None = None,
             compare: str | None = None, dt_s: float | None = None, timesteps: int | None = None,
             device: str = "auto", loihi2_pj_per_op: float | None = None, inputs: str | Path | None = None) -> dict:
    """Run an exported file (or a run directory's) on ``target`` and return its summary; the
    result is also stored in the run (RUN_DIR/simulate-<target>-<request>.json, ``result_file``).
    ``inputs``: an .npz of the inputs themselves (targets/stimulus.py) instead of ``data``."""
    from .targets.simulate import simulate as run_simulation

    return run_simulation(Path(path), target, data, samples, compare, dt_s=dt_s, timesteps=timesteps,
                          device=device, loihi2_pj_per_op=loihi2_pj_per_op,
                          inputs=Path(inputs) if inputs is not None else None)


def check(run_dir: str | Path, target: str | None = None, *, data: str | None = None, samples: int | None = None,
          config: str | Path | None = None, rerun: bool = False, device: str = "auto", **limits) -> dict:
    """Gate the run's exported student on ``target``; ``limits`` by gate name
    (``min_accuracy=0.9``, ``max_accuracy_drop=0.01``, ...). ``result["passed"]`` is the verdict."""
    from .targets.check import check as run_check
    from .targets.gates import GATES

    unknown = sorted(set(limits) - set(GATES))
    if unknown:
        raise ConfigError(f"check(): unknown gate {unknown[0]!r}; gates are {', '.join(GATES)}")
    return run_check(Path(run_dir), target, limits, data, samples, Path(config) if config else None, rerun, device)


def report(run_dir: str | Path, *, data: str | None = None, samples: int | None = None, device: str = "auto",
           format: str = "html") -> dict:
    """Write RUN_DIR/report.html (or report.md with ``format="md"``)."""
    from .targets.report import write_report

    return write_report(Path(run_dir), data, samples, device, format=format)


def load_student(path: str | Path, folded: bool = False) -> nn.Module:
    """The student of a run directory (or a student.pt file) as a Norse module, eval mode, on the
    CPU; ``folded=True``: with every BatchNorm folded into its convolution, as exported."""
    from .students import fold_student
    from .students import load_student as load

    path = Path(path)
    student = load(path / STUDENT if path.is_dir() else path)
    return fold_student(student) if folded else student


def load_teacher(teacher: str | Path | nn.Module = "digits_cnn", *, weights: str | Path | None = None,
                 input_shape: tuple[int, int, int] | None = None, normalization: str = "",
                 num_classes: int = 10) -> nn.Module:
    """A teacher as distillation sees it (frozen, eval mode, with ``penultimate`` and ``head``):
    a run directory's teacher, a named architecture with ``weights``, a
    ``package.module:function``, a ``.pt2`` file, or an ``nn.Module``."""
    from .distillation import read_run_config
    from .teachers import load_teacher as load
    from .teachers.training import teacher_weights

    if not isinstance(teacher, nn.Module) and Path(teacher).is_dir():
        spec = read_run_config(Path(teacher)).teacher
    else:
        spec = _teacher_spec("load_teacher", teacher, weights, input_shape, normalization, num_classes)
    return load(spec, teacher_weights(spec))


def doctor() -> dict:
    """Versions, and whether each part works here (stars_deploy/diagnosis.py): ``healthy`` is
    True when every required part works; ``checks`` lists them all."""
    from .diagnosis import diagnose

    checks = diagnose()
    return {"healthy": all(c.ok for c in checks if c.required), "checks": [c.to_dict() for c in checks]}
