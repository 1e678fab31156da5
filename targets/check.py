"""``stars-deploy check``: simulate a run's exported file (or reuse a result that is still up to
date) and judge it against gates (targets/gates.py)."""

from __future__ import annotations

from pathlib import Path

from stars_deploy.errors import ConfigError
from stars_deploy.fileio import write_json
from stars_deploy.layout import STUDENT, check_file
from stars_deploy.progress import log
from stars_deploy.runs import is_converted, timestamp

from .gates import GATES, evaluate, load_check_config, measured_values
from .registry import REFERENCE_NONE, REFERENCE_STUDENT, get_target
from .simulate import resolve_file, run_eval_data, simulate, simulation_request, stored_result

DEFAULT_TARGET = "loihi"  # what CI gates when neither --target nor the config names one
CONVERTED_TARGET = "nir"  # the same for a converted teacher's run (stars-deploy convert: NIR only)


def check(run_dir: Path, target: str | None = None, limits: dict | None = None, data: str | None = None,
          samples: int | None = None, config: Path | None = None, rerun: bool = False,
          device: str = "auto", config_directory: Path = Path(".")) -> dict:
    """Gate a run's ``target`` simulation. ``limits`` (gate name -> limit) override the config
    file's. Returns the gate rows, the measured values and whether every gate passed (with no
    gates at all: the measurements, and passed)."""
    run_dir = Path(run_dir)
    converted = is_converted(run_dir)  # a converted teacher: no float student to compare with
    if not (run_dir / STUDENT).is_file() and not converted:
        raise ConfigError(f"{run_dir} is not a run directory (no {STUDENT}): check compares a target with "
                          "the run's float student")
    settings, config_file = load_check_config(config, None, config_directory)
    target = target or settings.get("target") or (CONVERTED_TARGET if converted else DEFAULT_TARGET)
    spec = get_target(target)
    if config_file is not None:  # now that the target is known, with its own sub-table
        settings, _ = load_check_config(config_file, target)
    gates = {name: settings[name] for name in GATES if name in settings}
    gates.update({name: value for name, value in (limits or {}).items() if value is not None})
    if not gates:  # measurements only: what a first check shows before limits are chosen
        where = f" or in {config_file}" if config_file else " (or a [check] table in stars-deploy.toml / pyproject.toml)"
        log(f"no gates given: measuring only; gate with e.g. --min-accuracy 0.9{where}")
    data = data or settings.get("data") or run_eval_data(run_dir)
    samples = samples if samples is not None else settings.get("samples")
    if samples is not None and samples < 1:
        raise ConfigError(f"samples must be at least 1, got {samples}")
    file, _ = resolve_file(run_dir, spec)
    compare = REFERENCE_NONE if converted else REFERENCE_STUDENT
    request = simulation_request(data, samples, compare)
    summary = None if rerun else stored_result(run_dir, target, file, request)
    reused = summary is not None
    if reused:
        log(f"{target}: reusing {summary['result_file']} (made from this {file} with this request)")
    else:
        summary = simulate(run_dir, target, data, samples, compare=compare, device=device)
    values = measured_values(summary)
    rows = evaluate(gates, values)
    result = {"run_dir": str(run_dir), "target": target, "file": str(file), "data": summary["data"],
              "samples": summary["samples"], "reused": reused, "result_file": summary["result_file"],
              "config_file": str(config_file) if config_file else None,
              "passed": all(row["passed"] for row in rows), "gates": rows, "measured": values,
              "checked_at": timestamp()}
    write_json(check_file(run_dir, target), result)
    return result
