"""``stars-deploy convert``: the teacher itself as a spiking network, data-free, in a run directory.

teacher -> calibration images made from the teacher alone (synthesis, or a distill run's pool)
-> ConvertedNetwork.calibrate (conversion.py: every ReLU an integrate-and-fire neuron with
reset by subtraction, threshold = a percentile of its activations) -> NIR graph
(exporters/converted_nir.py) -> the run directory:

    runs/<name>/
      convert.json       format, versions, teacher spec and checksum, T, dt, thresholds, calibration
      export/student.nir the spiking network, read by ``simulate --target nir`` and other NIR tools
      export/export.json the export record, as ``export`` writes it
      simulate-nir-*.json  with ``--data``: the NIR reference's accuracy on it

Converted networks keep the teacher's residual additions and need many more steps than a
distilled student (T = 32 where a student takes 4): NIR targets only; Loihi and ONNX export
students (``distill``).
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

import torch

from .conversion import DEFAULT_PERCENTILE, ConvertedNetwork
from .data import load_eval_data
from .devices import resolve_device
from .errors import CheckpointError, ConfigError
from .fileio import load_torch, write_json
from .layout import CONVERT, MANIFEST, POOL_DIR, export_dir
from .progress import log, progress_bar
from .runs import CONVERT_FORMAT, check_run_name, new_run_dir, read_manifest, sha256_file, timestamp, versions
from .students.neurons import DEFAULT_DT_S
from .teachers import Normalizer, TeacherSpec, load_teacher
from .teachers.training import teacher_weights
from .vocabulary import DT_KEY

DEFAULT_TIMESTEPS = 32  # CIFAR ResNet-20 through its NIR file: 72.9 % at T = 32 (benchmarks/README.md)
DEFAULT_CALIBRATION_IMAGES = 512
CONVERT_OPTIONS = ("timesteps", "calibration_images", "percentile", "samples", "device", "seed", "dt_s")  # api.convert


def synthetic_images(teacher, spec: TeacherSpec, count: int, device: torch.device, seed: int) -> torch.Tensor:
    """``count`` images (normalised space) synthesised from the teacher alone, with the
    synthesis settings `distill` uses for this teacher (host objective: BatchNorm statistics,
    cross-entropy on random labels, smoothness)."""
    from .distillation.config import make_config
    from .distillation.synthesis import PixelSynthesizer

    config = make_config("host", teacher=spec, eval_data=None).synthesis
    config = dataclasses.replace(config, batch_size=min(config.batch_size, count), method="pixel", compile="none")
    torch.manual_seed(seed)
    synthesizer = PixelSynthesizer(teacher, Normalizer(*spec.mean_std).to(device), config, spec.num_classes,
                                   spec.flips)
    batches, bar = [], progress_bar(count, "calibration images", "img")
    try:
        while sum(len(b) for b in batches) < count:
            images, _ = synthesizer.synthesize(None, spec.input_shape, device)
            batches.append(images.cpu())
            bar.update(len(images))
    finally:
        bar.close()
    return torch.cat(batches)[:count]


def pool_images(run_dir: Path, count: int, input_shape: tuple[int, ...]) -> torch.Tensor:
    """The first ``count`` images of a distill run's synthetic pool (RUN_DIR/pool/chunk_*.pt)."""
    chunks, total = [], 0
    for path in sorted((Path(run_dir) / POOL_DIR).glob("chunk_*.pt")):
        payload = load_torch(path, "pool chunk")
        images = payload.get("images") if isinstance(payload, dict) else None
        if not isinstance(images, torch.Tensor) or tuple(images.shape[1:]) != tuple(input_shape) \
                or not images.is_floating_point() or not bool(torch.isfinite(images).all()):
            raise CheckpointError(f"pool chunk {path} holds no finite float images of shape "
                                  f"{'x'.join(map(str, input_shape))}: it is not this teacher's pool")
        chunks.append(images.float())
        total += len(images)
        if total >= count:
            break
    if not chunks:
        raise ConfigError(f"--calibrate-on {run_dir}: no pool chunks in {Path(run_dir) / POOL_DIR}; give a "
                          "distill run of this teacher (or leave the option out to synthesise images)")
    return torch.cat(chunks)[:count]


def same_teacher(run_dir: Path, teacher_sha256: str | None) -> None:
    """Refuse a distill run whose manifest names another teacher checkpoint than ours."""
    if not (run_dir / MANIFEST).is_file() or teacher_sha256 is None:
        return
    theirs = read_manifest(run_dir).get("teacher_sha256")
    if theirs is not None and theirs != teacher_sha256:
        raise ConfigError(f"--calibrate-on {run_dir}: its pool was synthesised from another teacher checkpoint "
                          f"(sha256 {theirs[:12]}..., this teacher's is {teacher_sha256[:12]}...)")


def convert(spec: TeacherSpec, *, timesteps: int = DEFAULT_TIMESTEPS,
            calibration_images: int = DEFAULT_CALIBRATION_IMAGES, percentile: float = DEFAULT_PERCENTILE,
            calibrate_on: Path | None = None, eval_data: str | None = None, samples: int | None = None,
            runs_dir: Path = Path("runs"), run_name: str | None = None, device: str = "auto", seed: int = 0,
            dt_s: float = DEFAULT_DT_S) -> dict:
    """Convert ``spec``'s teacher into a run directory (module docstring); the summary."""
    if timesteps < 1 or calibration_images < 1:
        raise ConfigError("--timesteps and --calibration-images must be at least 1")
    if not (math.isfinite(dt_s) and dt_s > 0):
        raise ConfigError(f"--dt-s must be a positive number of seconds, got {dt_s}")
    if run_name is not None:
        check_run_name(run_name)
    target = resolve_device(device)
    if eval_data is not None:
        load_eval_data(eval_data).subset(samples)  # a wrong --data fails now, not after the synthesis
    start = time.perf_counter()
    weights = teacher_weights(spec)
    teacher = load_teacher(spec, weights).to(target)
    network = ConvertedNetwork(teacher)  # refuses an untraceable teacher before any synthesis
    images_start = time.perf_counter()
    if calibrate_on is not None:
        same_teacher(Path(calibrate_on), sha256_file(weights) if weights else None)
        images, source = pool_images(calibrate_on, calibration_images, spec.input_shape), str(calibrate_on)
    else:
        log(f"synthesising {calibration_images} calibration images from the teacher alone")
        images, source = synthetic_images(teacher, spec, calibration_images, target, seed), "synthesis"
    images_s = time.perf_counter() - images_start
    thresholds = network.to(target).calibrate(images.to(target), percentile)
    network = network.cpu()
    run_dir = new_run_dir(Path(runs_dir), run_name or f"{spec.arch.replace(':', '-')}-converted-T{timesteps}-"
                                                       f"{timestamp()}")
    teacher_dict = dataclasses.asdict(spec)
    teacher_dict["class_names"] = list(spec.class_names)
    record = {"format": CONVERT_FORMAT, "created": timestamp(), "versions": versions(), "teacher": teacher_dict,
              "teacher_weights": str(weights) if weights else None,
              "teacher_sha256": sha256_file(weights) if weights else None, "timesteps": timesteps, DT_KEY: dt_s,
              "reset": "subtract", "start": network.sites[0].start, "percentile": percentile,
              "thresholds": thresholds, "sites": len(thresholds),
              "calibration": {"source": source, "images": len(images), "seconds": images_s, "seed": seed},
              "eval_data": eval_data, "device": str(target)}
    write_json(run_dir / CONVERT, record)  # first: a run killed now is still seen as a converted one
    from .exporters.converted_nir import write_export
    from .exporters.registry import export_kind

    path = export_dir(run_dir) / export_kind("nir").file  # where `simulate --target nir` looks
    write_export(path, network, spec, record)
    log(f"converted {len(thresholds)} ReLUs into integrate-and-fire neurons; wrote {path}")
    summary = {**record, "run_dir": str(run_dir), "file": str(path), "wall_time_s": time.perf_counter() - start}
    if eval_data is not None:
        from .targets.simulate import simulate

        result = simulate(run_dir, "nir", eval_data, samples, device=device)
        summary.update(accuracy=result["accuracy"], samples=result["samples"],
                       spikes_per_sample=result["spikes_per_sample"], synops_per_sample=result["synops_per_sample"],
                       result_file=result["result_file"], wall_time_s=time.perf_counter() - start)
    return summary
