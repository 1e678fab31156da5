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
from pathlib import Path

import torch

from stars_deploy import vocabulary
from stars_deploy.data import check_fits, load_eval_data
from stars_deploy.devices import resolve_device
from stars_deploy.errors import CheckpointError
from stars_deploy.evaluation import accuracy, evaluate_pair, predict, teacher_logits_fn
from stars_deploy.fileio import load_torch, read_json, save_torch, write_json
from stars_deploy.layout import CHECKPOINT, DISTILL, MANIFEST, POOL_DIR, STUDENT
from stars_deploy.progress import log, progress_bar
from stars_deploy.runs import RUN_FORMAT, new_run_dir, sha256_file, timestamp, versions
from stars_deploy.students import build_student, save_student
from stars_deploy.students.neurons import resolve_lif_kernel, set_lif_kernel
from stars_deploy.teachers import Normalizer, load_teacher
from stars_deploy.teachers.training import teacher_weights

from .augment import train_augment
from .config import DistillConfig
from .distributed import Group, device_name, process_group
from .generator import GeneratorSynthesizer
from .objectives import kd_loss, rca_loss
from .pool import SyntheticPool
from .synthesis import PixelSynthesizer

CHECKPOINT_FORMAT = "stars-deploy/checkpoint-v1"
LR_FLOOR = 0.05  # the cosine schedule ends at this fraction of the initial learning rate


class Budget:
    """Progress in [0, 1] of a budget of rounds and/or wall-clock seconds (the larger part)."""

    def __init__(self, rounds: int | None, budget_s: float | None):
        self.rounds, self.budget_s = rounds, budget_s

    def progress(self, round_index: int, elapsed_s: float) -> float:
        parts = []
        if self.rounds:
            parts.append(round_index / self.rounds)
        if self.budget_s:
            parts.append(elapsed_s / self.budget_s)
        return min(1.0, max(parts))


def cosine_lr_scale(progress: float) -> float:
    """The learning rate's factor at ``progress``: 1 at the start, LR_FLOOR at the end."""
    return LR_FLOOR + (1 - LR_FLOOR) * 0.5 * (1 + math.cos(math.pi * progress))


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
    return f"{config.teacher.arch}-{config.student.family}-{config.objective}-s{config.seed}-{timestamp()}"


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
    resume = Path(resume) if resume is not None else None
    config = _resume_config(resume) if resume is not None else config or DistillConfig()
    with process_group(resolve_device(device_name(config.device))) as group:
        run = Distillation(config, group, start)
        run.setup(runs_dir, run_name, resume)
        run.train()
        return run.finish()


class Distillation:
    """One distillation in one process (one rank under torchrun): set up, resume or start the
    run directory, run rounds until the budget is spent, checkpoint, summarise."""

    def __init__(self, config: DistillConfig, group: Group, start: float):
        self.config, self.group, self.start = config, group, start
        self.device, self.main = group.device, group.is_main
        self.round_index, self.elapsed_s, self.history = 0, 0.0, []
        self.timings = {"synthesis_s": 0.0, "kd_s": 0.0, "eval_s": 0.0, "checkpoint_s": 0.0}
        self.last_terms: dict[str, float] = {}
        self.eval_set = None
        self.loss = None

    # ---- setup ------------------------------------------------------------------------------
    def setup(self, runs_dir: Path, run_name: str | None, resume: Path | None) -> None:
        """Teacher, evaluation data, run directory, student, optimiser, pool and synthesiser, in
        the order that makes the RNG draws of a run (and of a resumed one) the same."""
        config, group, spec = self.config, self.group, self.config.teacher
        with group.local_leader_first():  # one teacher training per machine, the others wait for it
            self.weights = teacher_weights(spec)
        # seeded after the teacher: training one (a fresh cache) seeds torch itself, and a run
        # must draw the same whether its teacher was cached or trained just now
        torch.manual_seed(config.seed + group.rank)  # rank 0 draws exactly what a single process draws
        self.teacher = load_teacher(spec, self.weights).to(self.device)
        self.normalizer = Normalizer(*spec.mean_std).to(self.device)
        if config.eval_data and self.main:  # rank 0 evaluates; the others wait at the next collective
            self._load_eval_set()
        if resume is None:  # only now: a run that cannot start leaves no directory behind
            self.run_dir = group.broadcast_object(
                new_run_dir(runs_dir, run_name or _run_name(config)) if self.main else None)
        else:
            self.run_dir = resume
        group.run_dir = self.run_dir
        self._build_models()
        if resume is not None:
            self._restore()
        elif self.main:
            self._write_manifest()
        self.trainer = group.wrap(self.student)  # DistributedDataParallel under torchrun

    def _load_eval_set(self) -> None:
        spec = self.config.teacher
        self.eval_set = load_eval_data(self.config.eval_data)
        check_fits(self.eval_set, spec.input_shape, spec.num_classes, f"teacher {spec.arch}")
        self.teacher_predictions = predict(teacher_logits_fn(self.teacher, self.normalizer), self.eval_set.images,
                                           self.device)
        self.teacher_accuracy = accuracy(self.teacher_predictions, self.eval_set.labels)
        log(f"teacher {spec.arch}: {self.teacher_accuracy:.1%} on {self.eval_set.name} ({len(self.eval_set)} images)")

    def _build_models(self) -> None:
        config, spec, device = self.config, self.config.teacher, self.device
        self.student = build_student(config.student).to(device)
        self.optimizer = torch.optim.Adam(self.student.parameters(), lr=config.kd_lr)
        self.pool = SyntheticPool(self.group.pool_directory(self.run_dir / POOL_DIR), config.pool_memory_mb, device)
        set_lif_kernel(self.student, resolve_lif_kernel(config.lif_kernel, device))
        if config.channels_last:
            self.teacher, self.student = (m.to(memory_format=torch.channels_last) for m in (self.teacher, self.student))
        host = GeneratorSynthesizer if config.synthesis.method == "generator" else PixelSynthesizer
        extra = {"input_shape": spec.input_shape, "device": device} if host is GeneratorSynthesizer else {}
        self.synthesizer = host(self.teacher, self.normalizer, config.synthesis, spec.num_classes,
                                spec.flips, **extra)
        self.low = self.normalizer.bounds()[0].to(device)
        self.flip = spec.flips
        self.budget = Budget(config.rounds, config.budget_s)

    def _write_manifest(self) -> None:
        config = self.config
        write_json(self.run_dir / MANIFEST, {
            "format": RUN_FORMAT, "created": timestamp(), "versions": versions(), "config": config.to_dict(),
            "teacher_weights": str(self.weights) if self.weights else None,
            "teacher_sha256": sha256_file(self.weights) if self.weights else None,
            vocabulary.DT_KEY: config.student.lif.dt_s, "reset": vocabulary.RESET,
            "integrator": vocabulary.INTEGRATOR, "layout": vocabulary.LAYOUT, "encoding": vocabulary.ENCODING,
            "device": str(self.device), "processes": self.group.world_size, "status": "running"})

    # ---- resume and checkpoint --------------------------------------------------------------
    def _restore(self) -> None:
        group, run_dir = self.group, self.run_dir
        checkpoint = load_torch(run_dir / CHECKPOINT, "distillation checkpoint")
        if checkpoint.get("format") != CHECKPOINT_FORMAT:
            raise CheckpointError(f"{run_dir / CHECKPOINT} is not a stars-deploy distillation checkpoint")
        processes = checkpoint.get("world_size", 1)
        if processes != group.world_size:
            raise CheckpointError(f"{run_dir} was distilled by {processes} process(es), this job has "
                                  f"{group.world_size}: resume it with torchrun --nproc-per-node {processes}"
                                  f"{' (or without torchrun)' if processes == 1 else ''}")
        self.student.load_state_dict(checkpoint["student"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.pool.restore(checkpoint["pool"], source=run_dir / POOL_DIR)
        own = checkpoint if self.main else checkpoint["other_ranks"][group.rank - 1]  # per-rank RNG, synthesiser
        self.synthesizer.load_state_dict(own.get("synthesizer", {}))
        self.round_index, self.elapsed_s = checkpoint["round"], checkpoint["elapsed_s"]
        self.history, self.timings = checkpoint["history"], checkpoint["timings"]
        _set_rng_state(own["rng"])
        log(f"resuming {run_dir} at round {self.round_index} ({self.elapsed_s:.0f} s spent, "
            f"{len(self.pool)} images in the pool)")

    def checkpoint(self) -> None:
        """Every rank's RNG and synthesiser state go to rank 0, which writes the checkpoint."""
        begin = time.perf_counter()
        states = self.group.gather({"rng": _rng_state(), "synthesizer": self.synthesizer.state_dict()})
        if self.main:
            self.pool.flush()
            save_torch(self.run_dir / CHECKPOINT, {
                "format": CHECKPOINT_FORMAT, "round": self.round_index, "elapsed_s": self.elapsed_s,
                "student": self.student.state_dict(), "optimizer": self.optimizer.state_dict(),
                "pool": self.pool.state(), "history": self.history, "timings": self.timings,
                "world_size": self.group.world_size, **states[0], "other_ranks": states[1:]})
        self.timings["checkpoint_s"] += time.perf_counter() - begin

    # ---- the rounds -------------------------------------------------------------------------
    def train(self) -> None:
        """Rounds until the budget is spent, checkpointing every ``checkpoint_every`` rounds and
        once at the end."""
        config = self.config
        bar = progress_bar(config.rounds if config.rounds else config.budget_s, "distill",
                           "round" if config.rounds else "s")
        bar.update(self.round_index if config.rounds else min(self.elapsed_s, config.budget_s))
        self.student.train()
        while self.budget.progress(self.round_index, self.elapsed_s) < 1.0:
            round_s = self.round()
            record = self.history[-1]
            bar.set_postfix({k: f"{record[k]:.3f}" for k in ("kd_loss", "student_accuracy") if k in record})
            bar.update(1 if config.rounds else min(round_s, max(0.0, config.budget_s - bar.n)))
            if self.round_index % config.checkpoint_every == 0:
                self.checkpoint()
        bar.close()
        self.checkpoint()

    def round(self) -> float:
        """One synthesise -> pool -> KD round; appends its record to the history and returns its
        seconds (rank 0's clock decides elapsed time on every rank)."""
        config, group = self.config, self.group
        round_start = time.perf_counter()
        images, self.last_terms = self.synthesizer.synthesize(self.student, config.teacher.input_shape, self.device)
        for batch in group.share_batch(images):  # every rank's batch, in rank order
            self.pool.add(batch)
        synthesis_done = time.perf_counter()
        lr_scale = cosine_lr_scale(self.budget.progress(self.round_index, self.elapsed_s))
        for param_group in self.optimizer.param_groups:
            param_group["lr"] = config.kd_lr * lr_scale
        for _ in range(config.kd_steps):
            self.loss = self._kd_step()
        group.sync_buffers(self.student)  # the student's running statistics: rank 0's on every rank
        round_end = time.perf_counter()
        self.timings["synthesis_s"] += synthesis_done - round_start
        self.timings["kd_s"] += round_end - synthesis_done
        self.elapsed_s = group.agree(self.elapsed_s + round_end - round_start)  # one schedule, one stop
        self.round_index += 1
        record = {"round": self.round_index, "elapsed_s": round(self.elapsed_s, 3),
                  "synthetic_images": len(self.pool), "kd_loss": float(self.loss.detach()),
                  **{f"syn_{k}": v for k, v in self.last_terms.items()}}
        if self.eval_set is not None and self.round_index % config.eval_every == 0:
            record.update(self.evaluate())
        self.history.append(record)
        return round_end - round_start

    def _kd_step(self) -> torch.Tensor:
        """One student optimiser step on an augmented minibatch from the pool."""
        config = self.config
        batch = train_augment(self.pool.sample(config.kd_batch_size), self.low, self.flip)
        with torch.no_grad(), torch.autocast(self.device.type, torch.bfloat16, enabled=config.synthesis.teacher_bf16):
            teacher_features = self.teacher.penultimate(batch)
            teacher_logits = self.teacher.head(teacher_features)
        teacher_features, teacher_logits = teacher_features.float(), teacher_logits.float()
        with self.group.guard():  # DistributedDataParallel's collectives: buffers forward, gradients backward
            out = self.trainer(batch)
            if config.kd_mode == "per_step":
                loss = torch.stack([kd_loss(z, teacher_logits, config.kd_temperature) for z in out.logits_t]).mean()
            else:
                loss = kd_loss(out.logits, teacher_logits, config.kd_temperature)
            if config.b_rca > 0:
                loss = loss + config.b_rca * rca_loss(teacher_features, out.features, config.synthesis.rca_variant)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
        self.optimizer.step()
        return loss

    def evaluate(self) -> dict:
        begin = time.perf_counter()
        metrics = evaluate_pair(self.student, self.teacher_predictions, self.normalizer, self.eval_set, self.device)
        self.timings["eval_s"] += time.perf_counter() - begin
        return metrics

    # ---- the end ----------------------------------------------------------------------------
    def finish(self) -> dict:
        """Save the student, write distill.json and the completed manifest (rank 0); return the
        summary."""
        config, group, run_dir = self.config, self.group, self.run_dir
        self.student.eval()
        digests = group.check_replicas(self.student.state_dict())  # every rank ends with rank 0's student
        if self.main:
            save_student(run_dir / STUDENT, self.student)
        kd_images = self.round_index * config.kd_steps * config.kd_batch_size * group.world_size
        summary = {"run_dir": str(run_dir), "objective": config.objective, "device": str(self.device),
                   "processes": group.world_size, "rounds": self.round_index, "synthetic_images": len(self.pool),
                   "distill_time_s": self.elapsed_s, "kd_images": kd_images,
                   "synthesis_images_per_s": len(self.pool) / max(self.timings["synthesis_s"], 1e-9),
                   "kd_images_per_s": kd_images / max(self.timings["kd_s"], 1e-9),
                   "timings_s": self.timings, "last_synthesis_terms": self.last_terms}
        if self.eval_set is not None:
            summary.update({"teacher_accuracy": self.teacher_accuracy, "eval_data": self.eval_set.name,
                            "eval_images": len(self.eval_set), **self.evaluate()})
        summary["wall_time_s"] = time.perf_counter() - self.start
        if self.main:
            write_json(run_dir / DISTILL, {**summary, "history": self.history, "replica_digests": digests})
            manifest = read_json(run_dir / MANIFEST, "run manifest")
            manifest.update(status="complete", finished=timestamp(), timings_s=self.timings)
            write_json(run_dir / MANIFEST, manifest)
        return summary
