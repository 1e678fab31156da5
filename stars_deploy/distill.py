"""The distillation loop: synthesise -> pool -> KD steps, under a budget, resumable.

    repeat until the budget (rounds or wall-clock seconds) is spent:
      1. synthesise one batch with the host + STARS objectives (synthesis.py)
      2. add it to the synthetic pool (pool.py)
      3. run kd_steps student optimiser steps on augmented minibatches from the pool:
         L_stu = tau^2 KL(softmax(z_A/tau) || softmax(z_S/tau)) + b_rca L_RCA(h_A detached)

The learning rate follows a cosine over the budget's progress (the larger of rounds done /
rounds and seconds spent / budget_s). Every ``checkpoint_every`` rounds the student, the
optimiser, the RNG states, the pool's chunk list and the history go to checkpoint.pt, so
``resume`` continues a killed run; on the CPU a resumed run with a round budget ends with
exactly the weights of an uninterrupted one.

Under torchrun (distributed.py) N processes run this same loop: each synthesises its own
batch, the N batches are shared so every rank's pool is the same, the KD steps are data
parallel (DistributedDataParallel), rank 0's clock decides the budget, and rank 0 alone
writes the run directory.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from .data import check_fits, load_eval_data
from .distributed import Group, device_name, process_group
from .errors import CheckpointError, ConfigError
from .evaluation import accuracy, evaluate_pair, predict, teacher_logits_fn
from .fileio import load_torch, read_json, save_torch, write_json
from .objectives import kd_loss, rca_loss
from .pool import SyntheticPool
from .progress import log, progress_bar
from .runs import (CHECKPOINT, DISTILL, MANIFEST, POOL_DIR, RUN_FORMAT, STUDENT, new_run_dir,
                   sha256_file, timestamp, versions)
from .neurons import LIFConfig
from .students import StudentConfig, build_student, save_student
from .generator import GENERATOR_STEPS, GENERATOR_Z_LR, GeneratorSynthesizer
from .neurons import LIF_KERNELS, resolve_lif_kernel, set_lif_kernel
from .synthesis import PixelSynthesizer, SynthesisConfig
from .teacher_training import ensure_default_teacher
from .teachers import Normalizer, TeacherSpec, load_teacher

CHECKPOINT_FORMAT = "stars-deploy/checkpoint-v1"
LR_FLOOR = 0.05  # the cosine schedule ends at this fraction of the initial learning rate

# Objective shorthands: the STARS weights each one switches on (explicit options override).
# Measured on the digits default (25 rounds, seed 0): l_rca 10 / b_rca 1 cost 7 points against
# l_rca 1 / b_rca 0.1; TAR terms are ~1e-3 per layer, so l_tar 1 does nothing and 100 measured best.
DEFAULT_L_RCA = 1.0
DEFAULT_B_RCA = 0.1
DEFAULT_L_TAR = 100.0
OBJECTIVES = {
    "host": {"l_rca": 0.0, "l_tar": 0.0, "b_rca": 0.0},
    "rca": {"l_rca": DEFAULT_L_RCA, "l_tar": 0.0, "b_rca": DEFAULT_B_RCA},
    "tar": {"l_rca": 0.0, "l_tar": DEFAULT_L_TAR, "b_rca": 0.0},
    "stars": {"l_rca": DEFAULT_L_RCA, "l_tar": DEFAULT_L_TAR, "b_rca": DEFAULT_B_RCA},
}
KD_MODES = ("mean", "per_step")
HOSTS = ("deepinversion", "adi")  # pixel optimisation, without / with the competition term
DEFAULT_L_ADV = 1.0


@dataclass(frozen=True)
class DistillConfig:
    teacher: TeacherSpec = field(default_factory=TeacherSpec)
    student: StudentConfig = field(default_factory=StudentConfig)
    synthesis: SynthesisConfig = field(default_factory=SynthesisConfig)
    objective: str = "host"
    rounds: int | None = None
    budget_s: float | None = 90.0
    kd_steps: int = 10
    kd_batch_size: int = 128
    kd_lr: float = 2e-3
    kd_temperature: float = 20.0
    kd_mode: str = "mean"
    b_rca: float = 0.0
    seed: int = 0
    eval_data: str | None = "digits"
    eval_every: int = 10
    checkpoint_every: int = 5
    pool_memory_mb: float = 1024.0
    device: str = "auto"
    lif_kernel: str = "auto"  # norse, fused, compiled; auto: compiled on CUDA, norse on the CPU (neurons.py)
    channels_last: bool = False  # NHWC memory layout for the teacher's and the student's convolutions

    def __post_init__(self):
        if self.rounds is None and self.budget_s is None:
            raise ConfigError("give a budget: --rounds N and/or --budget-s SECONDS")
        if self.rounds is not None and self.rounds < 1:
            raise ConfigError(f"--rounds must be at least 1, got {self.rounds}")
        if self.budget_s is not None and not self.budget_s > 0:
            raise ConfigError(f"--budget-s must be a positive number of seconds, got {self.budget_s}")
        for name in ("kd_steps", "kd_batch_size", "eval_every", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.kd_lr <= 0 or self.kd_temperature <= 0 or self.b_rca < 0 or self.pool_memory_mb <= 0:
            raise ConfigError("--kd-lr, --kd-temperature and --pool-memory-mb must be positive, --b-rca >= 0")
        if self.lif_kernel not in LIF_KERNELS:
            raise ConfigError(f"--lif-kernel {self.lif_kernel!r}: choose one of {', '.join(LIF_KERNELS)}")
        if self.kd_mode not in KD_MODES:
            raise ConfigError(f"--kd-mode {self.kd_mode!r}: choose one of {', '.join(KD_MODES)}")
        if self.objective not in OBJECTIVES and self.objective != "custom":
            raise ConfigError(f"--objective {self.objective!r}: choose one of {', '.join(OBJECTIVES)}")
        if self.device not in ("auto", "cpu") and not self.device.startswith("cuda"):
            raise ConfigError(f"--device {self.device!r}: use auto, cpu, cuda or cuda:N")
        if self.student.input_shape != self.teacher.input_shape or self.student.num_classes != self.teacher.num_classes:
            raise ConfigError("the student's input shape and classes must match the teacher's")

    def to_dict(self) -> dict:
        values = asdict(self)
        values["teacher"]["class_names"] = list(self.teacher.class_names)
        values["student"] = self.student.to_dict()
        values["synthesis"] = self.synthesis.to_dict()
        return values

    @classmethod
    def from_dict(cls, values: dict) -> "DistillConfig":
        values = dict(values)
        teacher = dict(values.pop("teacher"))
        teacher["class_names"] = tuple(teacher.get("class_names", ()))
        synthesis = dict(values.pop("synthesis"))
        synthesis["tar_ks"] = tuple(synthesis["tar_ks"])
        return cls(teacher=TeacherSpec(**teacher), student=StudentConfig.from_dict(values.pop("student")),
                   synthesis=SynthesisConfig(**synthesis), **values)


def make_config(objective: str = "host", teacher: TeacherSpec | None = None, student: dict | None = None,
                synthesis: dict | None = None, host: str = "deepinversion", lif: dict | None = None,
                eval_data: str | None = "auto", **options) -> DistillConfig:
    """A DistillConfig from an objective shorthand plus explicit overrides.

    ``student`` holds StudentConfig fields (input shape and classes come from the teacher),
    ``lif`` LIFConfig fields, ``synthesis`` SynthesisConfig fields. An explicit
    ``l_rca``/``l_tar`` (in synthesis) or ``b_rca`` overrides what the objective switches on;
    ``host="adi"`` switches the competition term on (l_adv = DEFAULT_L_ADV) unless given.
    ``eval_data="auto"`` evaluates on the held-out digits for the digits teacher and on
    nothing otherwise; None never evaluates. The generator host (``synthesis={"method":
    "generator"}``) takes GENERATOR_STEPS steps per batch unless ``steps`` is given.
    """
    if objective not in OBJECTIVES:
        raise ConfigError(f"--objective {objective!r}: choose one of {', '.join(OBJECTIVES)}")
    if host not in HOSTS:
        raise ConfigError(f"--host {host!r}: choose one of {', '.join(HOSTS)}")
    teacher = teacher or TeacherSpec()
    weights = dict(OBJECTIVES[objective])
    synthesis = {key: value for key, value in (synthesis or {}).items() if value is not None}
    if host == "adi":
        synthesis.setdefault("l_adv", DEFAULT_L_ADV)
    if synthesis.get("method") == "generator":
        synthesis.setdefault("steps", GENERATOR_STEPS)
        synthesis.setdefault("lr", GENERATOR_Z_LR)
    student = {key: value for key, value in (student or {}).items() if value is not None}
    lif = {key: value for key, value in (lif or {}).items() if value is not None}
    if lif:
        student["lif"] = LIFConfig(**lif)
    weights.update({k: synthesis.pop(k) for k in ("l_rca", "l_tar") if k in synthesis})
    if options.get("b_rca") is not None:
        weights["b_rca"] = options.pop("b_rca")
    options.pop("b_rca", None)
    student_config = StudentConfig(input_shape=teacher.input_shape, num_classes=teacher.num_classes, **student)
    synthesis_config = SynthesisConfig(l_rca=weights["l_rca"], l_tar=weights["l_tar"], **synthesis)
    if eval_data == "auto":
        eval_data = "digits" if teacher.arch == "digits_cnn" else None
    return DistillConfig(teacher=teacher, student=student_config, synthesis=synthesis_config,
                         objective=objective, b_rca=weights["b_rca"], eval_data=eval_data,
                         **{k: v for k, v in options.items() if v is not None or k in ("rounds", "budget_s")})


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    return torch.device(name)


def train_augment(images: torch.Tensor, low: torch.Tensor, flip: bool) -> torch.Tensor:
    """Per-sample random crop with padding (side/8 px: 4 on 32x32, 1 on 8x8), padded with
    black, and per-sample horizontal flip where the data allows it."""
    batch, _, height, width = images.shape
    pad = max(1, width // 8)
    padded = F.pad(images - low, (pad, pad, pad, pad)) + low
    dy = torch.randint(0, 2 * pad + 1, (batch, 1, 1), device=images.device)  # device RNG: no copies
    dx = torch.randint(0, 2 * pad + 1, (batch, 1, 1), device=images.device)
    rows = dy + torch.arange(height, device=images.device).view(1, -1, 1)
    cols = dx + torch.arange(width, device=images.device).view(1, 1, -1)
    batch_index = torch.arange(batch, device=images.device).view(-1, 1, 1)
    cropped = padded.permute(0, 2, 3, 1)[batch_index, rows, cols].permute(0, 3, 1, 2)
    if flip:
        mask = (torch.rand(batch, device=images.device) < 0.5).view(-1, 1, 1, 1)
        cropped = torch.where(mask, cropped.flip(3), cropped)
    return cropped.contiguous()


class _Budget:
    def __init__(self, rounds: int | None, budget_s: float | None):
        self.rounds, self.budget_s = rounds, budget_s

    def progress(self, round_index: int, elapsed_s: float) -> float:
        parts = []
        if self.rounds:
            parts.append(round_index / self.rounds)
        if self.budget_s:
            parts.append(elapsed_s / self.budget_s)
        return min(1.0, max(parts))


def _rng_state() -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _run_name(config: DistillConfig) -> str:
    return (f"{config.teacher.arch}-{config.student.family}-{config.objective}-s{config.seed}-{timestamp()}")


def _resume_config(run_dir: Path) -> DistillConfig:
    manifest = read_json(run_dir / MANIFEST, "run manifest")
    if manifest.get("format") != RUN_FORMAT:
        raise CheckpointError(f"{run_dir / MANIFEST} is not a stars-deploy run manifest")
    if not (run_dir / CHECKPOINT).is_file():
        raise CheckpointError(f"{run_dir} has no {CHECKPOINT} to resume from (it stopped before the first checkpoint)")
    return DistillConfig.from_dict(manifest["config"])


def distill(config: DistillConfig | None = None, runs_dir: Path = Path("runs"), run_name: str | None = None,
            resume: Path | None = None) -> dict:
    """Run (or, with ``resume=RUN_DIR``, continue) a distillation; returns the summary that
    distill.json also holds. Progress goes to stderr. Under torchrun every process calls
    this and takes part (distributed.py); each returns the summary, rank 0 writes the run."""
    start = time.perf_counter()
    config = _resume_config(Path(resume)) if resume is not None else config or DistillConfig()
    with process_group(resolve_device(device_name(config.device))) as group:
        return _distill(config, group, start, runs_dir, run_name, Path(resume) if resume is not None else None)


def _distill(config: DistillConfig, group: Group, start: float, runs_dir: Path, run_name: str | None,
             resume: Path | None) -> dict:
    device, main = group.device, group.is_main
    torch.manual_seed(config.seed + group.rank)  # rank 0 draws exactly what a single process draws

    spec = config.teacher
    with group.local_leader_first():  # one teacher training per machine, the others wait for it
        weights = Path(spec.weights) if spec.weights else ensure_default_teacher()
    teacher = load_teacher(spec, weights).to(device)
    normalizer = Normalizer(*spec.mean_std).to(device)
    eval_set = None
    if config.eval_data and main:  # rank 0 evaluates; the others wait at the next collective
        eval_set = load_eval_data(config.eval_data)
        check_fits(eval_set, spec.input_shape, spec.num_classes, f"teacher {spec.arch}")
        teacher_predictions = predict(teacher_logits_fn(teacher, normalizer), eval_set.images, device)
        teacher_accuracy = accuracy(teacher_predictions, eval_set.labels)
        log(f"teacher {spec.arch}: {teacher_accuracy:.1%} on {eval_set.name} ({len(eval_set)} images)")

    if resume is None:  # only now: a run that cannot start leaves no directory behind
        run_dir = group.broadcast_object(new_run_dir(runs_dir, run_name or _run_name(config)) if main else None)
    else:
        run_dir = resume
    group.run_dir = run_dir
    student = build_student(config.student).to(device)
    optimizer = torch.optim.Adam(student.parameters(), lr=config.kd_lr)
    pool = SyntheticPool(group.pool_directory(run_dir / POOL_DIR), config.pool_memory_mb, device)
    set_lif_kernel(student, resolve_lif_kernel(config.lif_kernel, device))
    if config.channels_last:
        teacher, student = (m.to(memory_format=torch.channels_last) for m in (teacher, student))
    if config.synthesis.method == "generator":
        synthesizer = GeneratorSynthesizer(teacher, normalizer, config.synthesis, spec.num_classes,
                                           spec.architecture.hflip, input_shape=spec.input_shape, device=device)
    else:
        synthesizer = PixelSynthesizer(teacher, normalizer, config.synthesis, spec.num_classes,
                                       spec.architecture.hflip)
    low = normalizer.bounds()[0].to(device)
    flip = spec.architecture.hflip
    budget = _Budget(config.rounds, config.budget_s)
    round_index, elapsed_s, history = 0, 0.0, []
    timings = {"synthesis_s": 0.0, "kd_s": 0.0, "eval_s": 0.0, "checkpoint_s": 0.0}

    if resume is not None:
        checkpoint = load_torch(run_dir / CHECKPOINT, "distillation checkpoint")
        if checkpoint.get("format") != CHECKPOINT_FORMAT:
            raise CheckpointError(f"{run_dir / CHECKPOINT} is not a stars-deploy distillation checkpoint")
        processes = checkpoint.get("world_size", 1)
        if processes != group.world_size:
            raise CheckpointError(f"{run_dir} was distilled by {processes} process(es), this job has "
                                  f"{group.world_size}: resume it with torchrun --nproc-per-node {processes}"
                                  f"{' (or without torchrun)' if processes == 1 else ''}")
        student.load_state_dict(checkpoint["student"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        pool.restore(checkpoint["pool"], source=run_dir / POOL_DIR)
        own = checkpoint if main else checkpoint["other_ranks"][group.rank - 1]  # per-rank RNG and synthesiser
        synthesizer.load_state_dict(own.get("synthesizer", {}))
        round_index, elapsed_s = checkpoint["round"], checkpoint["elapsed_s"]
        history, timings = checkpoint["history"], checkpoint["timings"]
        _set_rng_state(own["rng"])
        log(f"resuming {run_dir} at round {round_index} ({elapsed_s:.0f} s spent, {len(pool)} images in the pool)")
    elif main:
        manifest = {"format": RUN_FORMAT, "created": timestamp(), "versions": versions(),
                    "config": config.to_dict(), "teacher_weights": str(weights),
                    "teacher_sha256": sha256_file(weights), "dt_s": config.student.lif.dt_s,
                    "reset": "zero", "integrator": "euler", "layout": "NCHW", "encoding": "direct",
                    "device": str(device), "processes": group.world_size, "status": "running"}
        write_json(run_dir / MANIFEST, manifest)
    trainer = group.wrap(student)  # the student for KD steps: DistributedDataParallel under torchrun

    def checkpoint_now() -> None:
        """Every rank's RNG and synthesiser state go to rank 0, which writes the checkpoint."""
        begin = time.perf_counter()
        states = group.gather({"rng": _rng_state(), "synthesizer": synthesizer.state_dict()})
        if main:
            pool.flush()
            save_torch(run_dir / CHECKPOINT, {
                "format": CHECKPOINT_FORMAT, "round": round_index, "elapsed_s": elapsed_s,
                "student": student.state_dict(), "optimizer": optimizer.state_dict(), "pool": pool.state(),
                "history": history, "timings": timings, "world_size": group.world_size,
                **states[0], "other_ranks": states[1:]})
        timings["checkpoint_s"] += time.perf_counter() - begin

    def evaluate_now() -> dict:
        begin = time.perf_counter()
        metrics = evaluate_pair(student, teacher_predictions, normalizer, eval_set, device)
        timings["eval_s"] += time.perf_counter() - begin
        return metrics

    bar = progress_bar(config.rounds if config.rounds else config.budget_s, "distill",
                       "round" if config.rounds else "s")
    bar.update(round_index if config.rounds else min(elapsed_s, config.budget_s))
    student.train()
    last_terms: dict[str, float] = {}
    while budget.progress(round_index, elapsed_s) < 1.0:
        round_start = time.perf_counter()
        images, last_terms = synthesizer.synthesize(student, spec.input_shape, device)
        for batch in group.share_batch(images):  # every rank's batch, in rank order
            pool.add(batch)
        synthesis_done = time.perf_counter()
        lr_scale = LR_FLOOR + (1 - LR_FLOOR) * 0.5 * (1 + math.cos(math.pi * budget.progress(round_index, elapsed_s)))
        for param_group in optimizer.param_groups:
            param_group["lr"] = config.kd_lr * lr_scale
        for _ in range(config.kd_steps):
            batch = train_augment(pool.sample(config.kd_batch_size), low, flip)
            with torch.no_grad(), torch.autocast(device.type, torch.bfloat16, enabled=config.synthesis.teacher_bf16):
                teacher_features = teacher.penultimate(batch)
                teacher_logits = teacher.head(teacher_features)
            teacher_features, teacher_logits = teacher_features.float(), teacher_logits.float()
            with group.guard():  # DistributedDataParallel's collectives: buffers forward, gradients backward
                out = trainer(batch)
                if config.kd_mode == "per_step":
                    loss = torch.stack([kd_loss(z, teacher_logits, config.kd_temperature) for z in out.logits_t]).mean()
                else:
                    loss = kd_loss(out.logits, teacher_logits, config.kd_temperature)
                if config.b_rca > 0:
                    loss = loss + config.b_rca * rca_loss(teacher_features, out.features, config.synthesis.rca_variant)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
            optimizer.step()
        group.sync_buffers(student)  # the student's running statistics: rank 0's on every rank
        round_end = time.perf_counter()
        timings["synthesis_s"] += synthesis_done - round_start
        timings["kd_s"] += round_end - synthesis_done
        elapsed_s = group.agree(elapsed_s + round_end - round_start)  # rank 0's clock: one schedule, one stop
        round_index += 1
        record = {"round": round_index, "elapsed_s": round(elapsed_s, 3), "synthetic_images": len(pool),
                  "kd_loss": float(loss.detach()), **{f"syn_{k}": v for k, v in last_terms.items()}}
        if eval_set is not None and round_index % config.eval_every == 0:
            record.update(evaluate_now())
        history.append(record)
        bar.set_postfix({k: f"{record[k]:.3f}" for k in ("kd_loss", "student_accuracy") if k in record})
        bar.update(1 if config.rounds else min(round_end - round_start, max(0.0, config.budget_s - bar.n)))
        if round_index % config.checkpoint_every == 0:
            checkpoint_now()
    bar.close()
    checkpoint_now()

    student.eval()
    digests = group.check_replicas(student.state_dict())  # every rank ends with rank 0's student
    if main:
        save_student(run_dir / STUDENT, student)
    kd_images = round_index * config.kd_steps * config.kd_batch_size * group.world_size
    summary = {"run_dir": str(run_dir), "objective": config.objective, "device": str(device),
               "processes": group.world_size, "rounds": round_index, "synthetic_images": len(pool),
               "distill_time_s": elapsed_s, "kd_images": kd_images,
               "synthesis_images_per_s": len(pool) / max(timings["synthesis_s"], 1e-9),
               "kd_images_per_s": kd_images / max(timings["kd_s"], 1e-9),
               "timings_s": timings, "last_synthesis_terms": last_terms}
    if eval_set is not None:
        summary.update({"teacher_accuracy": teacher_accuracy, "eval_data": eval_set.name,
                        "eval_images": len(eval_set), **evaluate_now()})
    summary["wall_time_s"] = time.perf_counter() - start
    if main:
        write_json(run_dir / DISTILL, {**summary, "history": history, "replica_digests": digests})
        manifest = read_json(run_dir / MANIFEST, "run manifest")
        manifest.update(status="complete", finished=timestamp(), timings_s=timings)
        write_json(run_dir / MANIFEST, manifest)
    return summary
