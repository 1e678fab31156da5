"""Run directories: one per distill run, every file written atomically (names in layout.py).

The manifest's schema (format ``stars-deploy/run-v1``), checked by :func:`read_manifest`
whenever a run directory is read (resume, export, simulate, check, report):

    format        "stars-deploy/run-v1"                        required
    config        the DistillConfig as a table (distillation/config.py checks its fields)  required
    status        "running" | "interrupted" | "complete"       written by distill
    processes     int >= 1 (torchrun processes)                written by distill
    created, finished, teacher_weights, teacher_sha256, device: strings; dt_s: a positive number

Run names are one path component: a name never leaves the runs directory.
"""

from __future__ import annotations

import hashlib
import math
import platform
import time
from pathlib import Path
from typing import Any

import torch

from .version import __version__
from .errors import CheckpointError, ConfigError
from .fileio import read_json, remove_orphans
from .layout import CONVERT, EXPORT_DIR, MANIFEST, POOL_DIR, STUDENT

RUN_FORMAT = "stars-deploy/run-v1"
CONVERT_FORMAT = "stars-deploy/convert-v1"  # convert.json, a converted teacher's run (converter.py)
RUNNING, INTERRUPTED, COMPLETE = "running", "interrupted", "complete"
STATUSES = (RUNNING, INTERRUPTED, COMPLETE)
# Temporary files of an atomic write older than this are orphans of a killed process: a live
# writer touches its own file continuously and renames it within seconds.
ORPHAN_AGE_S = 120.0
_OPTIONAL_STRINGS = ("created", "finished", "teacher_weights", "teacher_sha256", "device")


def check_run_name(name: str, where: str = "--name") -> str:
    """A run directory name: one path component, so the run stays inside its runs directory."""
    if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name \
            or "\0" in name:
        raise ConfigError(f"{where} {name!r}: a run name is one directory name (no '/', not '.' or '..'); "
                          "choose the parent folder with --runs-dir")
    return name


def read_manifest(run_dir: Path) -> dict[str, Any]:
    """RUN_DIR/manifest.json, checked against the schema above; a CheckpointError names the
    file and the key that is missing or wrong."""
    path = Path(run_dir) / MANIFEST
    manifest = read_json(path, "run manifest")

    def refuse(problem: str):
        raise CheckpointError(f"run manifest {path}: {problem}; it was not written by stars-deploy distill or "
                              "was edited: restore it or distil the run again")

    if not isinstance(manifest, dict):
        refuse("not a JSON object")
    if manifest.get("format") != RUN_FORMAT:
        refuse(f"key 'format' is {manifest.get('format')!r}, expected {RUN_FORMAT!r}")
    if not isinstance(manifest.get("config"), dict):
        refuse("key 'config' is missing or not a table" if "config" not in manifest else "key 'config' is not a table")
    if "status" in manifest and manifest["status"] not in STATUSES:
        refuse(f"key 'status' is {manifest['status']!r}, expected one of {', '.join(STATUSES)}")
    processes = manifest.get("processes", 1)
    if isinstance(processes, bool) or not isinstance(processes, int) or processes < 1:
        refuse(f"key 'processes' is {processes!r}, expected an integer >= 1")
    for key in _OPTIONAL_STRINGS:  # null where there is none (a teacher that holds its own weights)
        if manifest.get(key) is not None and not isinstance(manifest[key], str):
            refuse(f"key {key!r} is {manifest[key]!r}, expected a string or null")
    dt_s = manifest.get("dt_s", 1.0)
    if isinstance(dt_s, bool) or not isinstance(dt_s, (int, float)) or not math.isfinite(dt_s) or dt_s <= 0:
        refuse(f"key 'dt_s' is {dt_s!r}, expected a positive number of seconds")
    return manifest


def read_convert_record(run_dir: Path) -> dict | None:
    """RUN_DIR/convert.json with its teacher rebuilt as ``record["spec"]`` (a TeacherSpec), or
    None where the run was not converted; a record that is not one is refused, naming the file."""
    path = Path(run_dir) / CONVERT
    if not path.is_file():
        return None
    record = read_json(path, "convert record")
    problem = None
    if not isinstance(record, dict) or record.get("format") != CONVERT_FORMAT:
        problem = f"it is not a stars-deploy convert record (format {CONVERT_FORMAT})"
    elif not isinstance(record.get("teacher"), dict):
        problem = "its teacher is missing"
    else:
        values = dict(record["teacher"])
        values["class_names"] = tuple(values.get("class_names") or ())
        from .teachers import TeacherSpec

        try:
            record["spec"] = TeacherSpec(**values)
        except (TypeError, ValueError, ConfigError) as exc:
            problem = f"its teacher does not describe one ({exc})"
    if problem:
        raise CheckpointError(f"convert record {path}: {problem}; restore it or convert again")
    return record


def is_converted(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds a converted teacher (convert.json) rather than a student."""
    return (Path(run_dir) / CONVERT).is_file()


def open_run(run_dir: Path, older_than_s: float = ORPHAN_AGE_S) -> list[Path]:
    """Tidy a run directory that is about to be read or continued: remove the temporary files
    a killed process left (in the run, its pool and its export folder); returns them."""
    run_dir = Path(run_dir)
    return [orphan for folder in (run_dir, run_dir / POOL_DIR, run_dir / EXPORT_DIR)
            for orphan in remove_orphans(folder, older_than_s)]


def content_digest(payload: Any) -> str:
    """SHA-256 over a nested payload of dicts, lists, tensors and plain values, in a fixed order
    (dict keys sorted; tensors as dtype, shape and bytes): what a checkpoint stores of itself,
    so that a bit flip that still unpickles is caught."""
    digest = hashlib.sha256()

    def feed(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            tensor = value.detach().cpu().contiguous()
            digest.update(f"T{tensor.dtype}{tuple(tensor.shape)}|".encode())
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(value, dict):
            digest.update(f"D{len(value)}|".encode())
            for key in sorted(value, key=repr):
                digest.update(f"{key!r}:".encode())
                feed(value[key])
        elif isinstance(value, (list, tuple)):
            digest.update(f"L{len(value)}|".encode())
            for item in value:
                feed(item)
        else:
            digest.update(f"V{value!r}|".encode())

    feed(payload)
    return digest.hexdigest()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def versions() -> dict[str, str]:
    import norse

    return {"stars_deploy": __version__, "torch": torch.__version__, "norse": norse.__version__,
            "python": platform.python_version()}


def new_run_dir(runs_dir: Path, name: str) -> Path:
    """A fresh directory ``runs_dir/name`` (suffixed -2, -3, ... if taken); ``name`` is one
    path component (:func:`check_run_name`)."""
    runs_dir = Path(runs_dir)
    check_run_name(name)
    candidate, suffix = runs_dir / name, 2
    while candidate.exists():
        candidate, suffix = runs_dir / f"{name}-{suffix}", suffix + 1
    candidate.mkdir(parents=True)
    return candidate


def timestamp() -> str:
    return time.strftime("%Y%m%d-%H%M%S")


def latest_run(runs_dir: Path = Path("runs")) -> Path:
    """The most recently created run directory under ``runs_dir`` that has a student, or a
    converted teacher (convert.json)."""
    runs = [p.parent for name in (STUDENT, CONVERT) for p in Path(runs_dir).glob(f"*/{name}")]
    if not runs:
        raise ConfigError(f"no finished run under {runs_dir}/: run `stars-deploy distill` first or name RUN_DIR")

    def created(run: Path) -> float:
        record = run / MANIFEST if (run / MANIFEST).exists() else run / CONVERT
        return record.stat().st_mtime if record.exists() else 0
    return max(runs, key=created)
