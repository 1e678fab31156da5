"""Every name inside a run directory, in one place (docs/ARCHITECTURE.md).

    runs/<name>/
      manifest.json      versions, seed, config, teacher hash, dt, status, timings
      student.pt         {'format', 'config', 'state_dict'} (weights_only=True)
      distill.json       history, final accuracies, throughput
      checkpoint.pt      latest resumable state (student, optimiser, RNG, pool list, history)
      pool/              synthetic pool chunks
      export/            the exported files (exporters/registry.py names them) + export.json
      simulate-<target>-<request>.json   one per simulation request (data, samples, reference...)
      check-<target>.json (the last gates), report.html, report.md, plots/

    A converted teacher's run (``stars-deploy convert``, converter.py) holds convert.json instead of
    manifest.json, student.pt and distill.json; its export/ and simulate-* files are as above.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

MANIFEST = "manifest.json"
STUDENT = "student.pt"
DISTILL = "distill.json"
CONVERT = "convert.json"
CHECKPOINT = "checkpoint.pt"
POOL_DIR = "pool"
EXPORT_DIR = "export"
EXPORT_JSON = "export.json"
REPORT = "report.html"
REPORT_MD = "report.md"
PLOTS_DIR = "plots"
SIMULATION_PREFIX = "simulate-"
CHECK_PREFIX = "check-"
SNAPSHOT_DIR = "snapshots"


REQUEST_KEY_CHARS = 10  # hex digits of the request's SHA-256 in a result's file name


def request_key(request: dict) -> str:
    """A short, stable name for a simulation request (its canonical JSON, hashed)."""
    canonical = json.dumps(request, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:REQUEST_KEY_CHARS]


def simulation_file(run_dir: Path, target: str, request: dict) -> Path:
    """Where ``simulate --target TARGET`` stores the summary of one request inside a run: one
    file per request, so a 5-sample run never replaces a 450-sample one."""
    return Path(run_dir) / f"{SIMULATION_PREFIX}{target}-{request_key(request)}.json"


def simulation_files(run_dir: Path, target: str) -> list[Path]:
    """Every stored result of ``target`` in a run (callers check each file's own target field:
    a target whose name extends another's matches the same pattern)."""
    return sorted(Path(run_dir).glob(f"{SIMULATION_PREFIX}{target}-*.json"))


def export_dir(run_dir: Path) -> Path:
    return Path(run_dir) / EXPORT_DIR


def check_file(run_dir: Path, target: str) -> Path:
    """Where ``check --target TARGET`` stores its last gates inside a run (the report shows them)."""
    return Path(run_dir) / f"{CHECK_PREFIX}{target}.json"


def snapshot_file(run_dir: Path, elapsed_s: float) -> Path:
    """The student as it stood after ``elapsed_s`` seconds of distillation (--snapshot-every-s)."""
    return Path(run_dir) / SNAPSHOT_DIR / f"student-{elapsed_s:g}s.pt"
