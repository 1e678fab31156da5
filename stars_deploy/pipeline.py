"""``stars-deploy pipeline CONFIG.toml``: distill -> export -> simulate and check -> report, in
one command for CI jobs, with check's exit codes (0 pass, 1 a gate failed, 2 bad input).

    [distill]                  # any `stars-deploy distill` option, named as on the command line
    rounds = 40                # (--budget-s -> budget-s; flags take true/false)
    objective = "stars"
    runs-dir = "runs"
    name = "ci"                # the run directory's name (a suffix is added if it exists)

    [export]
    targets = ["nir", "loihi", "onnx"]      # default: nir and loihi

    [check]                    # the keys of a stars-deploy.toml [check] table (targets/gates.py)
    targets = ["loihi", "nir"] # or target = "loihi"; default: loihi
    min-accuracy = 0.9
    max-accuracy-drop = 0.01
    [check.loihi]
    max-latency-steps = 8

    [report]
    enabled = true             # write RUN_DIR/report.html at the end (default true)

Like the CLI, this module only orchestrates: exporters and targets are imported when used.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

import click

from .errors import ConfigError
from .progress import log

SECTIONS = ("distill", "export", "check", "report")
PIPELINE_ONLY = ("as_json", "quiet", "resume")  # distill options that make no sense in a pipeline file
DEFAULT_EXPORTS = ["nir", "loihi"]
NEEDS_EXPORT = {"nir": "nir", "loihi": "loihi", "lava": "loihi"}  # check target -> the export it runs


def _read(path: Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"pipeline config {path} does not exist")
    try:
        document = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None
    for section, table in document.items():
        if section not in SECTIONS:
            raise ConfigError(f"{path}: unknown section [{section}]; sections are {', '.join(SECTIONS)}")
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: {section} must be a table ([{section}])")
    return document


def distill_params(table: dict, where: str) -> dict:
    """Every parameter of the `distill` command, from ``table`` (keys named like its options)
    converted and checked by click, the others at their defaults."""
    from .cli import distill as command

    context = click.Context(command)
    by_key = {}
    for param in command.params:
        for option in param.opts:
            by_key[option.lstrip("-")] = param
        by_key.setdefault(param.name, param)
    params = {param.name: param.get_default(context, call=True) for param in command.params}
    for key, value in table.items():
        param = by_key.get(key) or by_key.get(key.replace("_", "-"))
        if param is None or param.name in PIPELINE_ONLY:
            raise ConfigError(f"{where}: unknown key {key!r}; use the options of `stars-deploy distill --help` "
                              "without their dashes (except json, quiet and resume)")
        try:
            params[param.name] = param.type_cast_value(context, value)
        except click.BadParameter as exc:
            raise ConfigError(f"{where}: {key} = {value!r}: {exc.message}") from None
    return params


def _export_targets(table: dict, where: str) -> list[str]:
    unknown = set(table) - {"targets"}
    if unknown:
        raise ConfigError(f"{where}: unknown key {sorted(unknown)[0]!r}; the only key is targets")
    targets = table.get("targets", DEFAULT_EXPORTS)
    if not isinstance(targets, list) or not all(t in ("nir", "loihi", "onnx") for t in targets):
        raise ConfigError(f"{where}: targets must be a list of nir, loihi, onnx; got {targets!r}")
    return targets


def _check_targets(table: dict, where: str) -> list[str]:
    targets = table.get("targets", [table.get("target", "loihi")])
    if not isinstance(targets, list) or not targets or not all(t in ("nir", "loihi", "lava") for t in targets):
        raise ConfigError(f"{where}: targets must be a non-empty list of nir, loihi, lava; got {targets!r}")
    return targets


def run_pipeline(path: Path, device: str = "cpu") -> dict:
    """Run every stage the file asks for; returns each stage's result and whether all gates passed.
    The whole file is validated before the (long) distillation starts."""
    from .cli import distill_config
    from .distill import distill
    from .distributed import launch_world_size

    if launch_world_size() > 1:
        raise ConfigError("pipeline runs in one process: distil under torchrun with `stars-deploy distill`, "
                          "then run export, check and report on its run directory")

    path = Path(path)
    document = _read(path)
    params = distill_params(document.get("distill", {}), f"{path} [distill]")
    exports = _export_targets(document.get("export", {}), f"{path} [export]")
    check_table = document.get("check")
    check_targets = _check_targets(check_table, f"{path} [check]") if check_table is not None else []
    if check_table is not None:
        from .targets.gates import load_check_config

        for target in check_targets:  # validates every key and per-target table now
            load_check_config(path, target)
            if NEEDS_EXPORT[target] not in exports:
                raise ConfigError(f"{path} [check]: target {target} needs [export] targets to include "
                                  f"{NEEDS_EXPORT[target]}")
    report = document.get("report", {})
    if set(report) - {"enabled"} or not isinstance(report.get("enabled", True), bool):
        raise ConfigError(f"{path} [report]: the only key is enabled = true|false")

    runs_dir, run_name = params.pop("runs_dir"), params.pop("run_name")
    for name in PIPELINE_ONLY:
        params.pop(name)
    config = distill_config(**params)
    summary = distill(config, runs_dir=runs_dir, run_name=run_name)
    run_dir = Path(summary["run_dir"])
    result = {"config": str(path), "run_dir": str(run_dir), "distill": summary, "exports": {}, "checks": {},
              "passed": True}

    from .exporters.run_export import export_run

    for target in exports:
        export_run(run_dir, target)
        result["exports"][target] = str(run_dir / "export")
        log(f"exported {target}")
    if check_targets:
        from .targets.check import check

        for target in check_targets:
            outcome = check(run_dir, target, config=path, device=device)
            result["checks"][target] = outcome
            result["passed"] &= outcome["passed"]
    if report.get("enabled", True):
        from .targets.report import write_report

        result["report"] = write_report(run_dir, device=device)["report"]
    return result
