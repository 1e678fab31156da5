"""Run directories: one per distill run, every file written atomically (names in layout.py)."""

from __future__ import annotations

import hashlib
import platform
import time
from pathlib import Path

import torch

from .version import __version__
from .errors import ConfigError
from .layout import MANIFEST, STUDENT

RUN_FORMAT = "stars-deploy/run-v1"


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
    """A fresh directory ``runs_dir/name`` (suffixed -2, -3, ... if taken)."""
    runs_dir = Path(runs_dir)
    candidate, suffix = runs_dir / name, 2
    while candidate.exists():
        candidate, suffix = runs_dir / f"{name}-{suffix}", suffix + 1
    candidate.mkdir(parents=True)
    return candidate


def timestamp() -> str:
    return time.strftime("%Y%m%d-%H%M%S")


def latest_run(runs_dir: Path = Path("runs")) -> Path:
    """The most recently created run directory under ``runs_dir`` that has a student."""
    runs = [p.parent for p in Path(runs_dir).glob(f"*/{STUDENT}")]
    if not runs:
        raise ConfigError(f"no finished run under {runs_dir}/: run `stars-deploy distill` first or name RUN_DIR")
    return max(runs, key=lambda p: (p / MANIFEST).stat().st_mtime if (p / MANIFEST).exists() else 0)
