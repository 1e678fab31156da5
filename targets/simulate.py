"""``stars-deploy simulate``: run an exported file on evaluation data and compare it.

Targets: ``nir`` (the float NIR reference, student.nir), ``loihi`` (the bit-accurate
emulator of student.net) and ``lava`` (Lava's fixed-point simulator running student.net).
The reference for ``--compare student`` is the run's student with BatchNorm folded (the
student as shipped); ``nir``, ``loihi`` and ``lava`` run that target on the same images (the
run's other exported file); ``none`` compares with nothing. Fixed-point records hold each
layer's T-step window (the pipeline delay undone, targets/loihi.py), so spikes compare step
by step with the float targets too.
"""

from __future__ import annotations

from pathlib import Path

import torch

from stars_deploy.data import load_eval_data
from stars_deploy.errors import ConfigError
from stars_deploy.fileio import read_json, write_json
from stars_deploy.progress import log
from stars_deploy.runs import MANIFEST, STUDENT, sha256_file
from stars_deploy.teachers import Normalizer

from .record import TargetResult, concat_results, summarize

BATCH = 256
TARGETS = ("nir", "loihi", "lava")
COMPARES = ("student",) + TARGETS + ("none",)
EXPORTED = {"nir": "student.nir", "loihi": "student.net", "lava": "student.net"}
EXPORT_TARGET = {"nir": "nir", "loihi": "loihi", "lava": "loihi"}
LATENCY_NOTES = {
    "nir": "float reference: no synaptic or pipeline delay; the decision is read after T steps",
    "loihi": "fixed point: one step of delay per synaptic connection; each layer's T-step window is recorded "
             "(the delay undone), the decision is read latency_steps = T + pipeline_delay_steps after the input",
}
LATENCY_NOTES["lava"] = LATENCY_NOTES["loihi"]


def _student_record(student, images: torch.Tensor) -> TargetResult:
    with torch.no_grad():
        out = student(images)
    steps, batch = out.logits_t.shape[:2]
    neurons = sum(s[0, 0].numel() for s in out.spikes.values())
    return TargetResult("student", out.logits_t, out.spikes, {}, neuron_updates=float(neurons * steps * batch))


def resolve_file(path: Path, target: str = "nir") -> tuple[Path, Path | None]:
    """(the exported file for ``target``, its run directory or None) for a file or a run directory."""
    path = Path(path)
    name = EXPORTED[target]
    if path.is_dir():
        candidate = path / "export" / name
        if not candidate.is_file():
            raise ConfigError(f"{path} has no export/{name}: run `stars-deploy export --target "
                              f"{EXPORT_TARGET[target]} {path}` first")
        return candidate, path
    run_dir = path.parent.parent
    return path, run_dir if (run_dir / STUDENT).is_file() else None


def resolve_nir_file(path: Path) -> tuple[Path, Path | None]:
    """(the .nir file, its run directory or None) for a .nir file or a run directory."""
    return resolve_file(path, "nir")


def _sibling(file: Path, target: str) -> Path:
    """The same export's file for another target (student.nir <-> student.net)."""
    sibling = file.with_suffix(Path(EXPORTED[target]).suffix)
    if not sibling.is_file():
        raise ConfigError(f"--compare {target}: {sibling} does not exist: run `stars-deploy export --target "
                          f"{EXPORT_TARGET[target]}` first")
    return sibling


def model_inputs(metadata: dict, images: torch.Tensor) -> torch.Tensor:
    """[0, 1] images as the exported file takes them: normalised as its metadata says."""
    normalization = metadata.get("normalization")
    return Normalizer(normalization["mean"], normalization["std"])(images) if normalization else images


def run_eval_data(run_dir: Path) -> str:
    """The data a run was evaluated on during distillation (its manifest), else the digits."""
    manifest = Path(run_dir) / MANIFEST
    if manifest.is_file():
        eval_data = read_json(manifest, "run manifest").get("config", {}).get("eval_data")
        if eval_data:
            return eval_data
    return "digits"


def load_target(target: str, file: Path, dt_s: float | None = None, timesteps: int | None = None,
                device: str = "cpu"):
    """(run(images) -> TargetResult, metadata, conventions paragraph) for one target's file."""
    if target == "nir":
        from .nir_reference import conventions, load_reference

        reference = load_reference(file, dt_s=dt_s, timesteps=timesteps, device=device)
        return reference.run, reference.metadata, conventions()
    if target == "loihi":
        from .loihi import conventions, load_emulator

        emulator = load_emulator(file, device=device)
        return (lambda images: emulator.run(images, timesteps)), emulator.metadata, conventions()
    if target == "lava":
        from .lava_sim import load_lava
        from .loihi import conventions

        runner = load_lava(file)
        return (lambda images: runner.run(images, timesteps)), runner.metadata, conventions()
    raise ConfigError(f"--target {target!r}: choose one of {', '.join(TARGETS)}")


def simulate(path: Path, target: str = "nir", data: str = "digits", samples: int | None = None,
             compare: str | None = None, dt_s: float | None = None, timesteps: int | None = None,
             device: str = "cpu", loihi2_pj_per_op: float | None = None) -> dict:
    """Run ``target`` on ``data``; metrics in the common summary (targets.record).

    ``compare=None`` compares with the run's student when the file sits in a run directory,
    with nothing otherwise. Writes RUN_DIR/simulate-<target>.json inside a run."""
    if target not in TARGETS:
        raise ConfigError(f"--target {target!r}: choose one of {', '.join(TARGETS)}")
    file, run_dir = resolve_file(path, target)
    if compare is None:
        compare = "student" if run_dir is not None else "none"
    if compare not in COMPARES:
        raise ConfigError(f"--compare {compare!r}: choose one of {', '.join(COMPARES)}")
    run, metadata, conventions = load_target(target, file, dt_s, timesteps, device)
    eval_data = load_eval_data(data).subset(samples)
    images = model_inputs(metadata, eval_data.images)
    reference_run = None
    if compare == "student":
        if run_dir is None:
            raise ConfigError(f"{file} is not inside a run directory: use --compare none, nir, loihi or lava")
        from stars_deploy.folding import fold_student
        from stars_deploy.students import load_student

        student = fold_student(load_student(run_dir / STUDENT))
        reference_run = lambda batch: _student_record(student, batch)  # noqa: E731
    elif compare == target:
        reference_run = "self"
    elif compare != "none":
        reference_run = load_target(compare, _sibling(file, compare), dt_s, timesteps, device)[0]
    # Lava builds one network per call: give it every sample at once
    batch_size = len(images) if "lava" in (target, compare) else BATCH
    results, references = [], []
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size]
        results.append(run(batch).cpu())
        if reference_run == "self":
            references.append(results[-1])
        elif reference_run is not None:
            references.append(reference_run(batch).cpu())
    result = concat_results(results)
    summary = summarize(result, eval_data.labels, concat_results(references) if references else None,
                        loihi2_pj_per_op=loihi2_pj_per_op)
    summary.update(file=str(file), file_sha256=sha256_file(file), data=eval_data.name, compare=compare,
                   request={"data": data, "samples": samples, "compare": compare, "dt_s": dt_s,
                            "timesteps": timesteps, "loihi2_pj_per_op": loihi2_pj_per_op},
                   conventions=conventions, latency_note=LATENCY_NOTES[target])
    summary.setdefault("reference", None)
    for key in ("reference_accuracy", "agreement", "spike_mismatches"):
        summary.setdefault(key, None)
    if run_dir is not None:
        write_json(run_dir / f"simulate-{target}.json", summary)
    log(f"{target}: {summary['accuracy']:.1%} on {eval_data.name}")
    return summary


def simulate_nir(path: Path, data: str = "digits", samples: int | None = None, compare: str | None = None,
                 dt_s: float | None = None, timesteps: int | None = None, device: str = "cpu") -> dict:
    """:func:`simulate` with ``target="nir"`` (the float NIR reference)."""
    return simulate(path, "nir", data, samples, compare, dt_s, timesteps, device)
