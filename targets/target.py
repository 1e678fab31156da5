"""What a simulated hardware target is: one :class:`Target` record, read by the registry.

A target runs one exported file (the file of the export kind it names, exporters/registry.py)
on a batch of normalised images and returns the common result record (record.py). Its record
says everything the commands need to know about it: its name, the export it runs, how to
load a runner, what ``--compare`` may set it against, how to read its latency, and its energy
model. ``simulate``, ``check``, the gates, ``report`` and ``pipeline`` read only these records.
Defining a record registers it (``TARGETS``); registry.py imports the built-in target modules.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import torch

from stars_deploy.errors import ConfigError

from .record import TargetResult


@dataclass(frozen=True)
class RunnerOptions:
    dt_s: float | None = None  # integration step, for files without dt_s metadata
    timesteps: int | None = None  # steps per sample, for files without it
    device: torch.device = torch.device("cpu")


class Runner(Protocol):
    metadata: dict  # the file's metadata (normalisation, class names, timesteps, ...)

    def run(self, images: torch.Tensor) -> TargetResult:
        """Normalised images (B, *input shape) -> the record over the T steps."""


@dataclass(frozen=True)
class Target:
    name: str
    export: str  # the export kind whose file it runs ("nir", "loihi")
    load: Callable[[Path, RunnerOptions], Runner]
    summary: str  # one line for --help
    latency_note: str  # how to read latency_steps
    conventions: str  # what the runner assumes about the file, for users (in every summary)
    energy: Callable[[dict, float | None], dict] | None = None  # (per-sample counts, loihi2 pJ/op) -> J
    compares: tuple[str, ...] | None = None  # --compare choices besides student/none; None: every target
    whole_batch: bool = False  # builds one network per call: give it every sample at once
    report_simulates: bool = True  # `report` simulates it when no result is stored (False: too slow)

    def __post_init__(self):
        TARGETS[self.name] = self  # defining a target's record registers it


TARGETS: dict[str, Target] = {}  # filled as target modules define their records (registry.py imports them)


def registered(name: str) -> Target:
    if name not in TARGETS:
        raise ConfigError(f"--target {name!r}: choose one of {', '.join(TARGETS)}")
    return TARGETS[name]
