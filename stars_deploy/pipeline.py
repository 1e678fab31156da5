"""``stars-deploy pipeline CONFIG.toml``: distill -> export -> simulate and check -> report, in
one command for CI jobs, with check's exit codes (0 pass, 1 a gate failed, 2 bad input).

    [distill]                  # any `stars-deploy distill` option, named as on the command line
    rounds = 40                # (--budget-s -> budget-s; flags take true/false)
    objective = "stars"
    runs-dir = "runs"
    name = "ci"                # the run directory's name (a suffix is added if it exists); one
                               # directory name, and runs-dir relative without '..': a CI file
                               # never writes outside the directory it runs in

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
The [distill] table is validated against the library's option schema (distillation/options.py).
"""

from __future__ import annotations

import tomllib
from pathlib import Path

from .devices import resolve_device
from .distillation.options import RUN_OPTIONS, check_run_options, config_from_options, options_from_table
from .errors import ConfigError
from .progress import log

SECTIONS = ("distill", "export", "check", "report")
DEFAULT_EXPORTS = ["nir", "loihi"]
DEFAULT_CHECKS = ["loihi"]


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


def _export_targets(table: dict, where: str) -> list[str]:
    from .exporters.registry import EXPORTS

    unknown = set(table) - {"targets"}
    if unknown:
        raise ConfigError(f"{where}: unknown key {sorted(unknown)[0]!r}; the only key is targets")
    targets = table.get("targets", DEFAULT_EXPORTS)
    if not isinstance(targets, list) or not all(t in EXPORTS for t in targets):
        raise ConfigError(f"{where}: targets must be a list of {', '.join(EXPORTS)}; got {targets!r}")
    return targets


def _check_targets(table: dict, exports: list[str], path: Path) -> list[str]:
    """The [check] targets, each validated with its gates, and each with its export asked for."""
    from .targets.gates import load_check_config
    from .targets.registry import get_target, target_names

    where = f"{path} [check]"
    targets = table.get("targets", [table.get("target", DEFAULT_CHECKS[0])])
    if not isinstance(targets, list) or not targets or not all(t in target_names() for t in targets):
        raise ConfigError(f"{where}: targets must be a non-empty list of {', '.join(target_names())}; got {targets!r}")
    for target in targets:  # validates every key and per-target table now
        load_check_config(path, target)
        needs = get_target(target).export
        if needs not in exports:
            raise ConfigError(f"{where}: target {target} needs [export] targets to include {needs}")
    return targets


def run_pipeline(path: Path, device: str = "auto") -> dict:
    """Run every stage the file asks for; returns each stage's result and whether all gates passed.
    The whole file is validated before the (long) distillation starts."""
    from .distillation import distill
    from .distillation.distributed import launch_world_size

    if launch_world_size() > 1:
        raise ConfigError("pipeline runs in one process: distil under torchrun with `stars-deploy distill`, "
                          "then run export, check and report on its run directory")
    path = Path(path)
    resolve_device(device)  # the simulations' device (distill has its own), before any work
    document = _read(path)
    values = options_from_table(document.get("distill", {}), f"{path} [distill]")
    check_run_options(values["runs_dir"], values["run_name"], f"{path} [distill]")
    exports = _export_targets(document.get("export", {}), f"{path} [export]")
    check_table = document.get("check")
    check_targets = _check_targets(check_table, exports, path) if check_table is not None else []
    report = document.get("report", {})
    if set(report) - {"enabled"} or not isinstance(report.get("enabled", True), bool):
        raise ConfigError(f"{path} [report]: the only key is enabled = true|false")

    config = config_from_options(values)
    runs_dir, run_name = (values[name] for name in RUN_OPTIONS)
    summary = distill(config, runs_dir=runs_dir, run_name=run_name)
    run_dir = Path(summary["run_dir"])
    result = {"config": str(path), "run_dir": str(run_dir), "distill": summary, "exports": {}, "checks": {},
              "passed": True}
    from .exporters.registry import export_run

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
