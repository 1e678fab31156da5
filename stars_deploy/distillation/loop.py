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

Stops and failures (docs/safety.md):

- SIGINT or SIGTERM (one process): the round in progress finishes, a checkpoint is saved, one
  line says what was saved and the exact ``--resume`` command, and the process exits 130 or
  143 (interrupt.py). A second signal stops at once; the last checkpoint stays intact.
- ``--resume`` continues an interrupted or killed run; a finished one is refused (a longer
  run is a new run: its learning-rate schedule depends on the budget).
- A run that fails before its first checkpoint (a failed start) removes its directory.
- A NaN or infinite loss term, or non-finite synthetic images, stop training before anything
  of that round is saved, naming the term and the round (TrainingDiverged).
- Running out of memory is one line naming the device and the options that decide it; the
  configuration is first checked against the free memory (footprint.py).

Under torchrun (distributed.py) N processes run this same loop: each synthesises its own
batch, the N batches are shared so every rank's pool is the same, the KD steps are data
parallel (DistributedDataParallel), rank 0's clock decides the budget, and rank 0 alone
writes the run directory.
"""

from __future__ import annotations

import math
import os
import shlex
import shutil
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Iterator

import torch

from stars_deploy import vocabulary
from stars_deploy.data import check_fits, load_eval_data
from stars_deploy.devices import resolve_device
from stars_deploy.errors import CheckpointError, ConfigError, StarsDeployError
from stars_deploy.evaluation import accuracy, evaluate_pair, predict, teacher_logits_fn
from stars_deploy.fileio import fit_state_dict, load_torch, save_torch, write_json
from stars_deploy.interrupt import HardStop, Interrupted, StopSignals, signal_name
from stars_deploy.layout import CHECKPOINT, DISTILL, MANIFEST, POOL_DIR, STUDENT, snapshot_file
from stars_deploy.progress import log, progress_bar
from stars_deploy.runs import (COMPLETE, INTERRUPTED, RUN_FORMAT, RUNNING, check_run_name, content_digest,
                               new_run_dir, open_run, read_manifest, sha256_file, timestamp, versions)
from stars_deploy.students import build_student, save_student, student_family
from stars_deploy.students.neurons import resolve_lif_kernel, set_lif_kernel
from stars_deploy.students.rate import RateTwin
from stars_deploy.teachers import Normalizer, load_teacher
from stars_deploy.teachers.spec import check_finite_weights
from stars_deploy.teachers.training import teacher_weights

from .augment import mix_batch, train_augment
from .config import SPIKING_STEPS_PER_ROUND, DistillConfig, config_from_manifest
from .distributed import Group, PeerError, device_name, launch_rank, launch_world_size, launched, process_group
from .footprint import ADVICE, check_memory
from .generator import GeneratorSynthesizer
from .objectives import kd_loss, rca_loss
from .pool import SyntheticPool
from .synthesis import PixelSynthesizer

CHECKPOINT_FORMAT = "stars-deploy/checkpoint-v1"
LR_FLOOR = 0.05  # the cosine schedule ends at this fraction of the initial learning rate
# The checkpoint's schema (format stars-deploy/checkpoint-v1): key -> what it must hold.
CHECKPOINT_KEYS = {"format": str, "round": int, "elapsed_s": float, "student": dict, "optimizer": dict,
                   "pool": list, "history": list, "timings": dict, "rng": dict}
OPTIONAL_CHECKPOINT_KEYS = {"world_size": int, "synthesizer": dict, "other_ranks": list, "sha256": str,
                            "counts": dict}
DIGEST_KEY = "sha256"  # runs.content_digest of every other key: a flipped bit that still unpickles is refused
OUT_OF_MEMORY = ("can't allocate memory", "out of memory")  # the allocators' words (CPU, CUDA)


class TrainingDiverged(StarsDeployError):
    """A loss term or the synthetic images became NaN or infinite: training stopped."""


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


def resume_command(run_dir: Path) -> str:
    """The command that continues ``run_dir``, as a user would type it."""
    return f"stars-deploy distill --resume {shlex.quote(str(run_dir))}"


def _resume_config(run_dir: Path) -> DistillConfig:
    """The configuration of the run in ``run_dir``, if it can be resumed: a checked manifest, a
    checkpoint, and not finished. Rank 0 removes temporary files a killed writer left behind."""
    if not run_dir.is_dir():
        raise CheckpointError(f"--resume {run_dir}: {'not a directory' if run_dir.exists() else 'does not exist'}; "
                              f"give the run directory (the folder that holds {MANIFEST})")
    manifest = read_manifest(run_dir)
    config = config_from_manifest(manifest, run_dir / MANIFEST)
    if manifest.get("status") == COMPLETE or (run_dir / DISTILL).is_file():
        raise CheckpointError(f"{run_dir} is a finished run (status complete, {DISTILL} written): --resume only "
                              "continues interrupted runs; to train longer, start a new run with a larger "
                              "--rounds or --budget-s")
    if not (run_dir / CHECKPOINT).is_file():
        raise CheckpointError(f"{run_dir} has no {CHECKPOINT} to resume from (it stopped before the first checkpoint)")
    if launch_rank() == 0:
        for orphan in open_run(run_dir, older_than_s=0.0):  # the run is this process's now
            log(f"removed {orphan}, a temporary file left by a killed write")
    return config


def distill(config: DistillConfig | None = None, runs_dir: Path = Path("runs"), run_name: str | None = None,
            resume: Path | None = None) -> dict:
    """Run (or, with ``resume=RUN_DIR``, continue) a distillation; returns the summary that
    distill.json also holds. Progress goes to stderr. Under torchrun every process calls
    this and takes part (distributed.py); each returns the summary, rank 0 writes the run.

    Before any work: the run name (one directory name) and the memory the configuration
    needs (footprint.py). In one process SIGINT/SIGTERM stop at the next round's end with a
    checkpoint (:class:`Interrupted`); under torchrun a stop ends the job at once (distributed.py)."""
    start = time.perf_counter()
    resume = Path(resume) if resume is not None else None
    config = _resume_config(resume) if resume is not None else config or DistillConfig()
    if resume is None and run_name is not None:
        check_run_name(run_name)
    device = resolve_device(device_name(config.device))
    check_memory(config, device, launch_world_size(), int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    stops = None if launched() else StopSignals()  # torchrun stops its workers itself
    with process_group(device) as group:
        return Distillation(config, group, start).run(runs_dir, run_name, resume, stops)


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
        self._spiking: torch.nn.Module | None = None  # the spiking student's trainer (--spiking-fraction)
        self.run_dir: Path | None = None
        self.resumed = False
        self.stops: StopSignals | None = None
        self.checkpointed_round: int | None = None  # the round of the checkpoint on disk
        self.phase = "setting up"  # then "training", "saving the result": said when something stops it
        self.counts = {"kd_images": 0, "snapshots": 0}
        self._kd_finite: dict[str, torch.Tensor] = {}

    # ---- the whole run, and what a stop or a failure leaves -----------------------------------
    def run(self, runs_dir: Path, run_name: str | None, resume: Path | None, stops: StopSignals | None) -> dict:
        """Set up, train and finish, with ``stops`` handling SIGINT/SIGTERM (None: signals keep
        their handlers). A failure before the first checkpoint removes the fresh run directory;
        every failure's message says what was kept."""
        self.resumed, self.stops = resume is not None, stops
        try:
            with stops or nullcontext():
                self.setup(runs_dir, run_name, resume)
                if stops is not None:
                    stops.defer()
                self.phase = "training"
                self.train()
                self.phase = "saving the result"
                return self.finish()
        except HardStop as stop:
            kept = self._abandon()
            second = "a second " if self.phase != "setting up" else ""
            raise Interrupted(f"stopped by {second}{signal_name(stop.signum)} {self._when()}: {self._kept(kept, True)}",
                              stop.signum) from None
        except Interrupted:
            raise
        except PeerError:
            raise  # under torchrun: its message already says how to resume
        except BaseException as exc:
            kept = self._abandon()
            explained = self._explain(exc)
            if explained is None:
                raise
            if self.run_dir is not None:
                explained.args = (f"{explained}; {self._kept(kept, not isinstance(explained, TrainingDiverged))}",)
            raise explained from None

    def _abandon(self) -> bool:
        """After a failure: remove a fresh run directory that has no checkpoint (nothing in it
        can be resumed); True when the run directory is kept."""
        run_dir = self.run_dir
        if run_dir is None or not run_dir.exists():
            return False
        if self.resumed or not self.main or (run_dir / CHECKPOINT).is_file():
            return True
        shutil.rmtree(run_dir, ignore_errors=True)
        return False

    def _kept(self, kept: bool, resumable: bool) -> str:
        if self.run_dir is None:
            return "nothing was saved (no run directory had been made)"
        if not kept:
            return "nothing was saved and the run directory was removed"
        if not (self.run_dir / CHECKPOINT).is_file():
            return f"{self.run_dir} is unchanged"
        saved = self.checkpointed_round if self.checkpointed_round is not None else "its last"
        hint = f": resume with `{resume_command(self.run_dir)}`" if resumable else ""
        return f"the checkpoint of round {saved} in {self.run_dir} is intact{hint}"

    def _explain(self, exc: BaseException) -> StarsDeployError | None:
        """The one-line error for ``exc``: itself for a StarsDeployError, a ConfigError for an
        allocator that ran out of memory, None for anything else (a bug: it keeps its traceback)."""
        if isinstance(exc, StarsDeployError):
            return exc
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if isinstance(exc, (MemoryError, torch.OutOfMemoryError)) or \
                (isinstance(exc, RuntimeError) and any(words in str(exc) for words in OUT_OF_MEMORY)):
            return ConfigError(f"out of memory on {self.device} {self._when()} ({text[:200]}): {ADVICE}")
        return None

    def _when(self) -> str:
        return f"in round {self.round_index + 1}" if self.phase == "training" else f"while {self.phase}"

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
        trained = self.twin if self.twin is not None else self.student
        self.trainer = group.wrap(trained)  # DistributedDataParallel under torchrun
        if config.compile_student:
            self.trainer = torch.compile(self.trainer)

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
        self.twin = RateTwin(self.student, student_family(config.student.family).rate_forward) \
            if config.strategy == "twin" else None

    def _write_manifest(self) -> None:
        config = self.config
        write_json(self.run_dir / MANIFEST, {
            "format": RUN_FORMAT, "created": timestamp(), "versions": versions(), "config": config.to_dict(),
            "teacher_weights": str(self.weights) if self.weights else None,
            "teacher_sha256": sha256_file(self.weights) if self.weights else None,
            vocabulary.DT_KEY: config.student.lif.dt_s, "reset": vocabulary.RESET,
            "integrator": vocabulary.INTEGRATOR, "layout": vocabulary.LAYOUT, "encoding": vocabulary.ENCODING,
            "device": str(self.device), "processes": self.group.world_size, "status": RUNNING})

    def _set_status(self, status: str, **extra) -> None:
        """Rewrite the manifest's status (rank 0)."""
        if self.main:
            manifest = read_manifest(self.run_dir)
            manifest.update(status=status, **extra)
            write_json(self.run_dir / MANIFEST, manifest)

    # ---- resume and checkpoint --------------------------------------------------------------
    def _restore(self) -> None:
        group, run_dir = self.group, self.run_dir
        path = run_dir / CHECKPOINT
        checkpoint = load_torch(path, "distillation checkpoint")
        check_checkpoint(checkpoint, path)
        processes = checkpoint.get("world_size", 1)
        if processes != group.world_size:
            raise CheckpointError(f"{run_dir} was distilled by {processes} process(es), this job has "
                                  f"{group.world_size}: resume it with torchrun --nproc-per-node {processes}"
                                  f"{' (or without torchrun)' if processes == 1 else ''}")
        if processes > 1 and len(checkpoint.get("other_ranks", [])) != processes - 1:
            raise CheckpointError(f"distillation checkpoint {path}: key 'other_ranks' holds "
                                  f"{len(checkpoint.get('other_ranks', []))} entries, expected {processes - 1}")
        with restoring(path, "student"):
            fit_state_dict(self.student, checkpoint["student"], f"distillation checkpoint {path}: key 'student'")
            check_finite_weights(self.student, f"distillation checkpoint {path}: key 'student'")
        with restoring(path, "optimizer"):
            self.optimizer.load_state_dict(checkpoint["optimizer"])
        with restoring(path, "pool"):
            self.pool.restore(checkpoint["pool"], source=run_dir / POOL_DIR)
        own = checkpoint if self.main else checkpoint["other_ranks"][group.rank - 1]  # per-rank RNG, synthesiser
        with restoring(path, "synthesizer"):
            self.synthesizer.load_state_dict(own.get("synthesizer", {}))
        self.round_index, self.elapsed_s = checkpoint["round"], float(checkpoint["elapsed_s"])
        self.history = checkpoint["history"]
        self.timings.update(checkpoint["timings"])
        self.counts.update(checkpoint.get("counts", {}))
        with restoring(path, "rng"):
            _set_rng_state(own["rng"])
        self.checkpointed_round = self.round_index
        if self.main and read_manifest(run_dir).get("status") != RUNNING:
            self._set_status(RUNNING)
        log(f"resuming {run_dir} at round {self.round_index} ({self.elapsed_s:.0f} s spent, "
            f"{len(self.pool)} images in the pool)")

    def checkpoint(self) -> None:
        """Every rank's RNG and synthesiser state go to rank 0, which writes the checkpoint."""
        begin = time.perf_counter()
        states = self.group.gather({"rng": _rng_state(), "synthesizer": self.synthesizer.state_dict()})
        if self.main:
            self.pool.flush()
            payload = {
                "format": CHECKPOINT_FORMAT, "round": self.round_index, "elapsed_s": self.elapsed_s,
                "student": self.student.state_dict(), "optimizer": self.optimizer.state_dict(),
                "pool": self.pool.state(), "history": self.history, "timings": self.timings,
                "world_size": self.group.world_size, "counts": dict(self.counts), **states[0],
                "other_ranks": states[1:]}
            save_torch(self.run_dir / CHECKPOINT, {**payload, DIGEST_KEY: content_digest(payload)})
        self.checkpointed_round = self.round_index
        self.timings["checkpoint_s"] += time.perf_counter() - begin

    # ---- the rounds -------------------------------------------------------------------------
    def train(self) -> None:
        """Rounds until the budget is spent, checkpointing every ``checkpoint_every`` rounds and
        once at the end; a stop signal checkpoints at the end of its round and raises
        :class:`Interrupted`."""
        config = self.config
        bar = progress_bar(config.rounds if config.rounds else config.budget_s, "distill",
                           "round" if config.rounds else "s")
        bar.update(self.round_index if config.rounds else min(self.elapsed_s, config.budget_s))
        self.student.train()
        try:
            while self.budget.progress(self.round_index, self.elapsed_s) < 1.0:
                round_s = self.round()
                record = self.history[-1]
                bar.set_postfix({k: f"{record[k]:.3f}" for k in ("kd_loss", "student_accuracy") if k in record})
                bar.update(1 if config.rounds else min(round_s, max(0.0, config.budget_s - bar.n)))
                stop = self.stops is not None and self.stops.requested
                if self.round_index % config.checkpoint_every == 0 or stop:
                    self.checkpoint()
                if stop and self.budget.progress(self.round_index, self.elapsed_s) < 1.0:
                    self._interrupt(self.stops.signum)
        finally:
            bar.close()  # before any message: a bar cleared later would follow the one-line error
        self.checkpoint()

    def _interrupt(self, signum: int) -> None:
        """The safe point after a stop signal: the checkpoint is saved; say so and how to go on."""
        self._set_status(INTERRUPTED, interrupted=timestamp())
        config = self.config
        progress = f"{self.round_index} of {config.rounds} rounds" if config.rounds else \
            f"{self.elapsed_s:.0f} of {config.budget_s:g} s"
        raise Interrupted(f"interrupted by {signal_name(signum)}: saved {self.run_dir / CHECKPOINT} at round "
                          f"{self.round_index} ({progress}, {len(self.pool)} images in the pool); continue with "
                          f"`{resume_command(self.run_dir)}`", signum)

    def _kd_phase(self) -> bool:
        """Twin strategy: whether the synthesis phase is over (the KD phase has begun)."""
        return self.twin is not None and \
            self.budget.progress(self.round_index, self.elapsed_s) >= self.config.synthesis_fraction

    def _lr_progress(self) -> float:
        """Where the cosine learning rate stands: over the whole budget (direct), or over the
        KD phase (twin)."""
        progress = self.budget.progress(self.round_index, self.elapsed_s)
        if self.twin is None:
            return progress
        fraction, spiking = self.config.synthesis_fraction, self.config.spiking_fraction
        return min(1.0, max(0.0, (progress - fraction) / (1 - fraction - spiking)))

    def _spiking_phase(self) -> bool:
        """Twin strategy with --spiking-fraction: whether the last phase has begun, in which KD
        trains the spiking student itself (the hand-over's fine-tune)."""
        return self.twin is not None and self.config.spiking_fraction > 0 and \
            self.budget.progress(self.round_index, self.elapsed_s) >= 1 - self.config.spiking_fraction

    def _spiking_trainer(self) -> torch.nn.Module:
        """The spiking student as the KD steps train it (made once; eager: compiling it would cost
        more than the phase lasts on a CPU)."""
        if self._spiking is None:
            self._spiking = self.group.wrap(self.student)
        return self._spiking

    def round(self) -> float:
        """One round, appending its record to the history and returning its seconds (rank 0's
        clock decides elapsed time on every rank): synthesise -> pool -> KD steps (direct); in
        the twin strategy, synthesis alone until the synthesis phase is over, then KD steps on
        the rate twin alone. A twin run whose synthesis objective needs the student (L_RCA,
        L_ADV) trains the twin in the synthesis phase too, and gives the objective the twin:
        those terms compare the teacher with a student that learns, at one pass instead of T."""
        config, group = self.config, self.group
        round_start = time.perf_counter()
        kd_phase, spiking = self._kd_phase(), self._spiking_phase()
        trains = self.twin is None or kd_phase or config.synthesis.needs_student
        if not kd_phase:
            student = self.student if self.twin is None else self.twin
            images, self.last_terms = self.synthesizer.synthesize(student, config.teacher.input_shape, self.device)
            self._check_synthesis(images)
            for batch in group.share_batch(images):  # every rank's batch, in rank order
                self.pool.add(batch)
        synthesis_done = time.perf_counter()
        if trains:
            lr = config.spiking_lr if spiking else config.kd_lr * cosine_lr_scale(self._lr_progress())
            for param_group in self.optimizer.param_groups:
                param_group["lr"] = lr
            self._kd_finite = {}
            steps = SPIKING_STEPS_PER_ROUND if spiking else config.kd_steps
            for _ in range(steps):
                self.loss = self._kd_step(self._spiking_trainer() if spiking else None)
            self._check_kd()
            self.counts["kd_images"] += steps * config.kd_batch_size * group.world_size
            group.sync_buffers(self.student)  # the student's running statistics: rank 0's on every rank
        round_end = time.perf_counter()
        self.timings["synthesis_s"] += synthesis_done - round_start
        self.timings["kd_s"] += round_end - synthesis_done
        self.elapsed_s = group.agree(self.elapsed_s + round_end - round_start)  # one schedule, one stop
        self.round_index += 1
        record = {"round": self.round_index, "elapsed_s": round(self.elapsed_s, 3),
                  "synthetic_images": len(self.pool),
                  "phase": "spiking" if spiking else "kd" if kd_phase else (
                      "synthesis" if self.twin is not None else "round"),
                  **({"kd_loss": float(self.loss.detach())} if self.loss is not None and trains else {}),
                  **{f"syn_{k}": v for k, v in self.last_terms.items()}}
        if self.eval_set is not None and self.round_index % config.eval_every == 0:
            record.update(self.evaluate())
        self.history.append(record)
        self._snapshot()
        return round_end - round_start

    def _snapshot(self) -> None:
        """With --snapshot-every-s S: the student, as it stands, each time the distillation time
        passes a multiple of S (RUN_DIR/snapshots/student-<seconds>s.pt, rank 0)."""
        every = self.config.snapshot_every_s
        if every is None or not self.main:
            return
        while self.elapsed_s >= (self.counts["snapshots"] + 1) * every:
            self.counts["snapshots"] += 1
            was_training = self.student.training
            save_student(snapshot_file(self.run_dir, self.counts["snapshots"] * every), self.student.eval())
            self.student.train(was_training)

    def _check_synthesis(self, images: torch.Tensor) -> None:
        """Refuse a synthetic batch whose loss terms or pixels are not finite, before it
        reaches the pool. The terms are the batch's last step; each is named with its weight,
        because a finite term times a huge weight is the usual way in."""
        synthesis = self.config.synthesis
        bad = [name for name, value in self.last_terms.items()
               if not math.isfinite(value) and getattr(synthesis, f"l_{name}", 1.0) > 0]  # 0-weighted: not in L_syn
        if bad or not bool(torch.isfinite(images).all()):
            named = ", ".join(f"l_{name} (weight --l-{name} {getattr(synthesis, f'l_{name}'):g})" for name in bad)
            what = f"the synthesis loss term(s) {named} became NaN or infinite" if bad else \
                "the synthetic images became NaN or infinite"
            raise TrainingDiverged(f"round {self.round_index + 1}: {what}; training stopped and nothing of this "
                                   "round was saved. Check the teacher (does it overflow on random images?), or lower --synthesis-lr "
                                   "or the largest term weight, in a new run")

    def _check_kd(self) -> None:
        """Refuse a round whose KD loss terms were not finite at some step (flags kept on the
        device by _kd_step: one synchronisation per term and round, not per step)."""
        bad = [name for name, finite in self._kd_finite.items() if not bool(finite)]
        if bad:
            raise TrainingDiverged(f"round {self.round_index + 1}: the student loss term {', '.join(bad)} became NaN "
                                   "or infinite in its KD steps; training stopped and nothing of this round was "
                                   "saved. Lower --kd-lr or --kd-temperature in a new run")

    def _track_finite(self, name: str, value: torch.Tensor) -> None:
        finite = torch.isfinite(value.detach()).all()
        previous = self._kd_finite.get(name)
        self._kd_finite[name] = finite if previous is None else previous & finite

    def _kd_step(self, spiking: torch.nn.Module | None = None) -> torch.Tensor:
        """One student optimiser step on an augmented minibatch from the pool: of the trainer
        (the student, or its twin), or of ``spiking``, the spiking student in float32."""
        config = self.config
        trainer, kd_bf16 = (self.trainer, config.kd_bf16) if spiking is None else (spiking, False)
        batch = mix_batch(train_augment(self.pool.sample(config.kd_batch_size), self.low, self.flip), config.kd_mix)
        if config.channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        teacher_bf16 = config.synthesis.teacher_bf16 or config.kd_bf16
        with torch.no_grad(), torch.autocast(self.device.type, torch.bfloat16, enabled=teacher_bf16):
            teacher_features = self.teacher.penultimate(batch)
            teacher_logits = self.teacher.head(teacher_features)
        teacher_features, teacher_logits = teacher_features.float(), teacher_logits.float()
        with self.group.guard():  # DistributedDataParallel's collectives: buffers forward, gradients backward
            with torch.autocast(self.device.type, torch.bfloat16, enabled=kd_bf16):
                out = trainer(batch)
            out = out._replace(logits=out.logits.float(), logits_t=out.logits_t.float(), features=out.features.float())
            if config.kd_mode == "per_step":
                loss = torch.stack([kd_loss(z, teacher_logits, config.kd_temperature) for z in out.logits_t]).mean()
            else:
                loss = kd_loss(out.logits, teacher_logits, config.kd_temperature)
            self._track_finite("kd", loss)
            if config.b_rca > 0:
                rca = rca_loss(teacher_features, out.features, config.synthesis.rca_variant)
                self._track_finite("rca", rca)
                loss = loss + config.b_rca * rca
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
        kd_images = self.counts["kd_images"]
        summary = {"run_dir": str(run_dir), "objective": config.objective, "strategy": config.strategy,
                   "device": str(self.device),
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
            self._set_status(COMPLETE, finished=timestamp(), timings_s=self.timings)
        return summary


@contextmanager
def restoring(path: Path, key: str) -> Iterator[None]:
    """Loading one key of a checkpoint into the run: anything that does not fit (a wrong shape,
    a foreign optimiser, a corrupt RNG state) becomes one CheckpointError naming the key."""
    try:
        yield
    except StarsDeployError:
        raise
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"distillation checkpoint {path}: key {key!r} does not fit this run ({reason[:200]}); "
                              "the file is corrupt or from another configuration: restore it or start a new run") from None


def check_checkpoint(checkpoint, path: Path) -> None:
    """The checkpoint's schema (CHECKPOINT_KEYS): its format, every required key with the right
    type, a non-negative round and elapsed time; a CheckpointError names the key."""
    def refuse(problem: str):
        raise CheckpointError(f"distillation checkpoint {path}: {problem}; the file is corrupt or not a stars-deploy "
                              "checkpoint: restore it or start a new run")

    if not isinstance(checkpoint, dict):
        refuse("not a table of keys")
    if checkpoint.get("format") != CHECKPOINT_FORMAT:
        refuse(f"key 'format' is {checkpoint.get('format')!r}, expected {CHECKPOINT_FORMAT!r}")
    for key, kind in {**CHECKPOINT_KEYS, **OPTIONAL_CHECKPOINT_KEYS}.items():
        if key not in checkpoint:
            if key in CHECKPOINT_KEYS:
                refuse(f"key {key!r} is missing")
            continue
        value = checkpoint[key]
        numeric = kind in (int, float) and not isinstance(value, bool) and \
            isinstance(value, (int,) if kind is int else (int, float))
        if not (numeric if kind in (int, float) else isinstance(value, kind)):
            refuse(f"key {key!r} is a {type(value).__name__}, expected {kind.__name__}")
    if checkpoint["round"] < 0 or not math.isfinite(checkpoint["elapsed_s"]) or checkpoint["elapsed_s"] < 0:
        refuse(f"round {checkpoint['round']} / elapsed_s {checkpoint['elapsed_s']} out of range")
    if checkpoint.get("world_size", 1) < 1:
        refuse(f"key 'world_size' is {checkpoint['world_size']}, expected at least 1")
    sizes = [entry.get("size") if isinstance(entry, dict) else entry for entry in checkpoint["pool"]]
    if not all(isinstance(size, int) and not isinstance(size, bool) and size > 0 for size in sizes):
        refuse("key 'pool' must list positive chunk sizes")  # each with its sha256: pool.restore checks those
    if not all(isinstance(record, dict) for record in checkpoint["history"]) or \
            len(checkpoint["history"]) != checkpoint["round"]:
        refuse(f"key 'history' must hold one record per round ({checkpoint['round']})")
    if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in checkpoint["timings"].values()):
        refuse("key 'timings' must hold finite seconds")
    if not isinstance(checkpoint["rng"].get("cpu"), torch.Tensor):
        refuse("key 'rng' holds no CPU generator state")
    if DIGEST_KEY in checkpoint:  # checkpoints before the digest have none: their schema is all there is
        content = {key: value for key, value in checkpoint.items() if key != DIGEST_KEY}
        if content_digest(content) != checkpoint[DIGEST_KEY]:
            refuse("its content does not match its sha256 (a bit flipped, or it was edited)")
