"""Distillation on several processes under torchrun: everything torch.distributed lives here.

``torchrun --nproc-per-node N -m stars_deploy distill ...`` starts N copies of the command;
torchrun sets RANK, WORLD_SIZE and LOCAL_RANK, and :func:`process_group` joins them into one
group (NCCL on GPUs, gloo on the CPU). Without torchrun it yields a one-process
:class:`Group` whose collectives do nothing, so distill.py has one code path.

The design (docs/torchrun.md):

- Shared pool, not shards. Every rank synthesises its own batch each round (the torch seed
  is ``seed + rank``, so the batches differ), then :meth:`Group.share_batch` all-gathers them
  and every rank adds the same N batches, in rank order, to its pool. Every rank's pool is
  therefore identical: a checkpoint names it by rank 0's chunk files and a resumed group
  rebuilds it from them. Only images cross the network, once per round (B x C x H x W per
  rank), which is small next to the synthesis that produced them; sharding the pool instead
  would make each rank's student see only its own images and the checkpoint would need N pools.
- KD is data parallel: each rank draws its own minibatch from the (same) pool with its own
  RNG, the student is wrapped in DistributedDataParallel, and gradients are averaged by an
  all-reduce in every backward. The effective KD batch is N x kd_batch_size. The learning
  rate is not scaled: the optimiser is Adam, whose steps do not grow with the batch as SGD's
  do (the linear scaling rule is an SGD rule), and an unchanged rate keeps N = 1 exactly the
  single-process run. A larger batch only lowers the gradient noise.
- One clock: each rank measures its own round time, and :meth:`Group.agree` makes every rank
  use rank 0's elapsed seconds, so the learning-rate schedule and the stop decision of a
  wall-clock budget are the same on every rank (otherwise one rank stops a round early and
  the others wait for it forever).
- Rank 0 alone writes the run directory (manifest, pool chunks, checkpoints, student.pt,
  distill.json), evaluates and shows progress; the other ranks are quiet and wait for it at
  the next collective. Their pools spill, if they outgrow their memory bound, into a private
  temporary directory. Checkpoints hold every rank's RNG state and synthesiser state (the
  generator host's generator is per rank), gathered to rank 0, so ``--resume`` continues a
  group exactly; it needs the same number of processes and, across machines, the run
  directory on a shared filesystem.
- Failure: every collective has a finite timeout (DEFAULT_TIMEOUT_S, or
  $STARS_DEPLOY_DIST_TIMEOUT_S). A rank that dies makes torchrun stop the others (SIGTERM), or
  makes their next collective fail; both end in one line, ``stars-deploy: error: rank R of N:
  ...; the job ends. Resume with --resume RUN_DIR``, and a non-zero exit, never a hang.
"""

from __future__ import annotations

import hashlib
import os
import signal
import tempfile
import warnings
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import nn

from stars_deploy.errors import ConfigError, StarsDeployError
from stars_deploy.progress import set_quiet

TIMEOUT_ENV = "STARS_DEPLOY_DIST_TIMEOUT_S"
# Longer than anything one rank does while the others wait for it: rank 0's evaluation and
# checkpoint writes, or training the digits teacher (seconds) before the first round.
DEFAULT_TIMEOUT_S = 300.0


class PeerError(StarsDeployError):
    """Another rank failed, was stopped or stopped answering: this rank ends too."""


def launched() -> bool:
    """Whether this process was started by torchrun (which sets RANK and WORLD_SIZE)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def launch_rank() -> int:
    """This process's rank under torchrun; 0 without it."""
    return int(os.environ.get("RANK", "0"))


def launch_world_size() -> int:
    """The number of processes torchrun started; 1 without it."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def device_name(name: str) -> str:
    """The device a rank uses for ``--device name``: under torchrun, auto and cuda mean the GPU
    of this process's LOCAL_RANK (cpu without CUDA); one fixed cuda:N would put every rank on
    the same GPU, so it is refused for more than one process."""
    if not launched():
        return name
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if name == "auto":
        return f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        return f"cuda:{local_rank}"
    if name.startswith("cuda:") and launch_world_size() > 1:
        raise ConfigError(f"--device {name} under torchrun would put every process on one GPU: use --device auto "
                          "or cuda (each process takes the GPU of its LOCAL_RANK)")
    return name


def _timeout_s() -> float:
    text = os.environ.get(TIMEOUT_ENV)
    if text is None:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ConfigError(f"${TIMEOUT_ENV}={text!r}: give a positive number of seconds")
    return value


def state_digest(state_dict: dict[str, torch.Tensor]) -> str:
    """SHA-256 over a state dict's names, dtypes, shapes and bytes: equal digests, equal weights."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _to_cpu(value: Any) -> Any:
    """A copy of nested containers with every tensor on the CPU (for gathering to rank 0)."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {key: _to_cpu(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(item) for item in value)
    return value


class Group:
    """This process's place in the job: rank, world size, device, and the few collectives
    distillation needs. With ``world_size == 1`` and no torchrun, every collective is local."""

    def __init__(self, device: torch.device, rank: int = 0, world_size: int = 1, joined: bool = False):
        self.device, self.rank, self.world_size, self.joined = device, rank, world_size, joined
        self.run_dir: Path | None = None  # named in the failure message once known
        self._private: tempfile.TemporaryDirectory | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def _failure(self, reason: str) -> PeerError:
        resume = f" Resume with --resume {self.run_dir}" if self.run_dir else ""
        return PeerError(f"rank {self.rank} of {self.world_size}: {reason}; the job ends.{resume}")

    @contextmanager
    def guard(self) -> Iterator[None]:
        """Turn a failed collective (a dead or silent peer: gloo and NCCL raise RuntimeError)
        into one PeerError line that keeps the backend's first line of explanation."""
        try:
            yield
        except RuntimeError as exc:
            if not self.joined or isinstance(exc, StarsDeployError):
                raise
            detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise self._failure(f"another rank failed or stopped answering ({detail})") from None

    def wrap(self, model: nn.Module) -> nn.Module:
        """The model for training steps: under DistributedDataParallel when launched, so that
        backward all-reduces (averages) the gradients."""
        if not self.joined:
            return model
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        # a one-channel conv's weight gradient has a stride DDP calls unusual: harmless, copied
        warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
        with self.guard():
            return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)

    def share_batch(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's batch, in rank order, on every rank."""
        if not self.joined:
            return [images]
        images = images.contiguous()
        parts = [torch.empty_like(images) for _ in range(self.world_size)]
        with self.guard():
            dist.all_gather(parts, images)
        return parts

    def agree(self, value: float) -> float:
        """Rank 0's ``value`` on every rank."""
        if not self.joined:
            return value
        tensor = torch.tensor([value], dtype=torch.float64, device=self.device)
        with self.guard():
            dist.broadcast(tensor, 0)
        return float(tensor.item())

    def sync_buffers(self, model: nn.Module) -> None:
        """Rank 0's buffers (BatchNorm running statistics) on every rank. DDP copies them from
        rank 0 before each training forward, but each rank's last forward updates them from its
        own minibatch; synthesis and evaluation run the student in eval mode on them."""
        if self.joined:
            with self.guard():
                for buffer in model.buffers():
                    dist.broadcast(buffer, 0)

    def broadcast_object(self, value: Any) -> Any:
        """Rank 0's picklable ``value`` on every rank."""
        if not self.joined:
            return value
        box = [value]
        with self.guard():
            dist.broadcast_object_list(box, 0, device=self.device)
        return box[0]

    def gather(self, value: Any) -> list | None:
        """Every rank's ``value`` (tensors moved to the CPU) as a list on rank 0; None elsewhere."""
        value = _to_cpu(value)
        if not self.joined:
            return [value]
        box = [None] * self.world_size if self.is_main else None
        with self.guard():
            dist.gather_object(value, box, dst=0)
        return box

    def barrier(self) -> None:
        if self.joined:
            with self.guard():
                dist.barrier()

    @contextmanager
    def local_leader_first(self) -> Iterator[None]:
        """The body runs on each machine's LOCAL_RANK 0 first, then on the others: for work
        that fills a per-machine cache (training the default teacher) once."""
        leader = int(os.environ.get("LOCAL_RANK", "0")) == 0
        if not leader:
            self.barrier()
        yield
        if leader:
            self.barrier()

    def check_replicas(self, state_dict: dict[str, torch.Tensor]) -> list[str]:
        """Every rank's :func:`state_digest` of its student (on every rank); a PeerError when
        they differ, which DistributedDataParallel should make impossible."""
        digest = state_digest(state_dict)
        if not self.joined:
            return [digest]
        digests: list = [None] * self.world_size
        with self.guard():
            dist.all_gather_object(digests, digest)
        if len(set(digests)) != 1:
            raise self._failure("the ranks ended with different students (their replicas diverged)")
        return digests

    def pool_directory(self, run_pool: Path) -> Path:
        """Where this rank's pool writes chunks: rank 0 into the run directory, the others into
        a private temporary directory that :func:`process_group` removes at the end."""
        if self.is_main:
            return run_pool
        if self._private is None:
            self._private = tempfile.TemporaryDirectory(prefix=f"stars-deploy-pool-rank{self.rank}-")
        return Path(self._private.name)


@contextmanager
def process_group(device: torch.device) -> Iterator[Group]:
    """The group of this process: joined (init_process_group, NCCL on CUDA else gloo, finite
    timeout) under torchrun, local otherwise. Ranks other than 0 are quiet. Under torchrun a
    SIGTERM (torchrun stopping the survivors of a failed rank) ends with a one-line error."""
    if not launched():
        yield Group(device)
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    group = Group(device, rank, world_size, joined=True)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(seconds=_timeout_s()),
                            device_id=device if device.type == "cuda" else None)

    def stopped(signum, frame):
        raise group._failure("stopped by torchrun (another rank failed, or the job was cancelled)")

    previous = signal.signal(signal.SIGTERM, stopped)
    if rank != 0:
        set_quiet(True)
    try:
        yield group
        dist.destroy_process_group()  # not after a failure: a broken group may not tear down cleanly
    finally:
        signal.signal(signal.SIGTERM, previous)
        if group._private is not None:
            group._private.cleanup()
