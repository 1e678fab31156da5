"""The export registry: one record per export kind (``stars-deploy export --target NAME``).

An export kind names the file it writes into ``RUN_DIR/export/`` and the function that
writes it. The CLI, ``pipeline`` and the target registry (a target names the export it
runs) read this table; adding an export kind is one module plus one entry here.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from stars_deploy.errors import ConfigError


@dataclass(frozen=True)
class ExportOptions:
    teacher: bool = False  # ONNX: export the teacher too
    dt_s: float | None = None  # Loihi: integration step for a .nir file without dt_s metadata
    timesteps: int | None = None  # Loihi: steps per sample for a .nir file without it


@dataclass(frozen=True)
class ExportKind:
    name: str
    file: str  # what it writes into RUN_DIR/export/ ("student.nir")
    function: str  # "module:function" taking (path, ExportOptions) and returning the export.json payload
    summary: str  # one line for --help
    foreign_suffix: str | None = None  # a file of another tool it also lowers (".nir"), written beside it
    report: str | None = None  # "module:function": export.json payload -> extra lines `export` prints

    def export(self, path: Path, options: ExportOptions = ExportOptions()) -> dict:
        return _resolve(self.function)(Path(path), options)

    def report_lines(self, payload: dict) -> list[str]:
        return _resolve(self.report)(payload) if self.report else []

    @property
    def suffix(self) -> str:
        return Path(self.file).suffix


def _resolve(reference: str) -> Callable:
    module, function = reference.split(":")
    return getattr(importlib.import_module(module), function)


EXPORTS: dict[str, ExportKind] = {}


def register_export(kind: ExportKind) -> ExportKind:
    EXPORTS[kind.name] = kind
    return kind


for _kind in (
    ExportKind("nir", "student.nir", "stars_deploy.exporters.nir_export:export_nir",
               "NIR graph, BatchNorm folded (readable by other NIR tools)"),
    ExportKind("loihi", "student.net", "stars_deploy.exporters.loihi_export:export_loihi",
               "Loihi CUBA fixed point as a lava-dl netx HDF5 file (from the run's NIR, or any .nir)",
               foreign_suffix=".nir", report="stars_deploy.exporters.loihi_export:report_lines"),
    ExportKind("onnx", "student.onnx", "stars_deploy.exporters.onnx_export:export_onnx",
               "the student unrolled over T steps (and with --teacher the teacher) for onnxruntime"),
):
    register_export(_kind)


def export_kind(name: str) -> ExportKind:
    if name not in EXPORTS:
        raise ConfigError(f"--target {name!r}: choose one of {', '.join(EXPORTS)}")
    return EXPORTS[name]


def export_run(path: Path, target: str = "nir", teacher: bool = False, dt_s: float | None = None,
               timesteps: int | None = None) -> dict:
    """Export ``path`` (a run directory, or a foreign file the kind lowers) for ``target``
    into RUN_DIR/export/ (or beside the file) and return the export.json payload."""
    from stars_deploy.runs import is_converted

    kind = export_kind(target)
    path = Path(path)
    if path.is_dir() and is_converted(path) and target != "nir":
        raise ConfigError(f"{path} holds a converted teacher, which exports to NIR only (--target nir; `convert` "
                          "wrote export/student.nir already): Loihi resets to zero and netx holds no residual "
                          "additions; ONNX exports distilled students")
    if path.is_file() and kind.foreign_suffix is None:
        raise ConfigError(f"--target {target} exports a run directory; only "
                          f"{', '.join(k.name for k in EXPORTS.values() if k.foreign_suffix)} take a file")
    return kind.export(path, ExportOptions(teacher=teacher, dt_s=dt_s, timesteps=timesteps))
