"""The target registry: every simulated hardware target by name (``--target NAME``).

A target is one module whose :class:`~stars_deploy.targets.target.Target` record registers it
when the module is imported. The built-in modules are listed here; other packages can add
targets through the ``stars_deploy.targets`` entry point group (each entry point names a
module that defines a record). The CLI, ``pipeline``, ``check``, the gates and ``report``
read :func:`targets` and never name a target themselves.
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points
from pathlib import Path

from stars_deploy.errors import ConfigError
from stars_deploy.exporters.registry import export_kind
from stars_deploy.layout import export_dir

from .target import TARGETS, Target, registered

BUILT_IN = ("stars_deploy.targets.nir_reference", "stars_deploy.targets.loihi", "stars_deploy.targets.lava_sim")
ENTRY_POINT_GROUP = "stars_deploy.targets"
REFERENCE_STUDENT, REFERENCE_NONE = "student", "none"  # --compare choices that are not targets
_loaded = False


def _load() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for module in BUILT_IN:
        importlib.import_module(module)
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        entry.load()


def targets() -> dict[str, Target]:
    """Every registered target, built-in ones first."""
    _load()
    return TARGETS


def target_names() -> list[str]:
    return list(targets())


def get_target(name: str) -> Target:
    _load()
    return registered(name)


def compare_choices(target: Target) -> list[str]:
    """What ``--compare`` accepts for ``target``: the run's student, other targets, or none."""
    others = target.compares if target.compares is not None else target_names()
    return [REFERENCE_STUDENT, *others, REFERENCE_NONE]


def exported_file(target: Target, run_dir: Path) -> Path:
    """The file ``target`` runs inside a run directory (RUN_DIR/export/<its export's file>)."""
    return export_dir(run_dir) / export_kind(target.export).file


def sibling_file(file: Path, target: Target) -> Path:
    """The same export's file for another target (student.nir <-> student.net, FILE.nir <-> FILE.net)."""
    sibling = Path(file).with_suffix(export_kind(target.export).suffix)
    if not sibling.is_file():
        raise ConfigError(f"--compare {target.name}: {sibling} does not exist: run `stars-deploy export --target "
                          f"{target.export}` first")
    return sibling
