"""Every name inside a run directory, in one place (docs/ARCHITECTURE.md).

    runs/<name>/
      manifest.json      versions, seed, config, teacher hash, dt, status, timings
      student.pt         {'format', 'config', 'state_dict'} (weights_only=True)
      distill.json       history, final accuracies, throughput
      checkpoint.pt      latest resumable state (student, optimiser, RNG, pool list, history)
      pool/              synthetic pool chunks
      export/            the exported files (exporters/registry.py names them) + export.json
      simulate-<target>.json, check-<target>.json (the last gates), report.html, report.md, plots/
"""

from __future__ import annotations

from pathlib import Path

MANIFEST = "manifest.json"
STUDENT = "student.pt"
DISTILL = "distill.json"
CHECKPOINT = "checkpoint.pt"
POOL_DIR = "pool"
EXPORT_DIR = "export"
EXPORT_JSON = "export.json"
REPORT = "report.html"
REPORT_MD = "report.md"
PLOTS_DIR = "plots"
SIMULATION_PREFIX = "simulate-"
CHECK_PREFIX = "check-"


def simulation_file(run_dir: Path, target: str) -> Path:
    """Where ``simulate --target TARGET`` stores its summary inside a run."""
    return Path(run_dir) / f"{SIMULATION_PREFIX}{target}.json"


def export_dir(run_dir: Path) -> Path:
    return Path(run_dir) / EXPORT_DIR


def check_file(run_dir: Path, target: str) -> Path:
    """Where ``check --target TARGET`` stores its last gates inside a run (the report shows them)."""
    return Path(run_dir) / f"{CHECK_PREFIX}{target}.json"
