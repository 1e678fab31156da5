"""``stars-deploy simulate``: run an exported file on evaluation data and compare it.

The reference for ``--compare student`` is the run's student with BatchNorm folded (the
student as shipped: the same float32 weights as the file); ``--compare nir`` is the NIR
reference itself (useful once other targets exist); ``none`` compares with nothing.
"""

from __future__ import annotations

from pathlib import Path

import torch

from stars_deploy.data import load_eval_data
from stars_deploy.errors import ConfigError
from stars_deploy.fileio import write_json
from stars_deploy.progress import log
from stars_deploy.runs import STUDENT
from stars_deploy.teachers import Normalizer

from .nir_reference import TARGET, conventions, load_reference
from .record import TargetResult, concat_results, summarize

BATCH = 256
COMPARES = ("student", "nir", "none")


def _student_record(student, images: torch.Tensor) -> TargetResult:
    with torch.no_grad():
        out = student(images)
    return TargetResult("student", out.logits_t, out.spikes, {})


def resolve_nir_file(path: Path) -> tuple[Path, Path | None]:
    """(the .nir file, its run directory or None) for a .nir file or a run directory."""
    path = Path(path)
    if path.is_dir():
        candidate = path / "export" / "student.nir"
        if not candidate.is_file():
            raise ConfigError(f"{path} has no export/student.nir: run `stars-deploy export --target nir {path}` first")
        return candidate, path
    run_dir = path.parent.parent
    return path, run_dir if (run_dir / STUDENT).is_file() else None


def simulate_nir(path: Path, data: str = "digits", samples: int | None = None, compare: str | None = None,
                 dt_s: float | None = None, timesteps: int | None = None, device: str = "cpu") -> dict:
    """Run the NIR reference on ``data``; metrics in the common summary (targets.record).

    ``compare=None`` compares with the run's student when the file sits in a run directory,
    with nothing otherwise."""
    nir_file, run_dir = resolve_nir_file(path)
    if compare is None:
        compare = "student" if run_dir is not None else "none"
    if compare not in COMPARES:
        raise ConfigError(f"--compare {compare!r}: choose one of {', '.join(COMPARES)}")
    reference = load_reference(nir_file, dt_s=dt_s, timesteps=timesteps, device=device)
    eval_data = load_eval_data(data).subset(samples)
    normalization = reference.metadata.get("normalization")
    images = eval_data.images
    if normalization:
        images = Normalizer(normalization["mean"], normalization["std"])(images)
    student = None
    if compare == "student":
        if run_dir is None:
            raise ConfigError(f"{nir_file} is not inside a run directory: use --compare none or nir")
        from stars_deploy.folding import fold_student
        from stars_deploy.students import load_student

        student = fold_student(load_student(run_dir / STUDENT))
    results, references = [], []
    for start in range(0, len(images), BATCH):
        batch = images[start:start + BATCH]
        results.append(reference.run(batch).cpu())
        if compare == "student":
            references.append(_student_record(student, batch))
        elif compare == "nir":
            references.append(results[-1])
    result = concat_results(results)
    summary = summarize(result, eval_data.labels, concat_results(references) if references else None)
    summary.update(file=str(nir_file), data=eval_data.name, compare=compare, conventions=conventions(),
                   latency_note="float reference: no synaptic or pipeline delay; the decision is read after T steps")
    summary.setdefault("reference", None)
    for key in ("reference_accuracy", "agreement", "spike_mismatches"):
        summary.setdefault(key, None)
    if run_dir is not None:
        write_json(run_dir / f"simulate-{TARGET}.json", summary)
    log(f"{TARGET}: {summary['accuracy']:.1%} on {eval_data.name}")
    return summary
