"""The synthesis objective, and the pixel-optimisation host (DeepInversion) it plugs into.

One call of :meth:`PixelSynthesizer.synthesize` optimises a batch of B images, in the
teacher's normalised input space, for ``steps`` Adam steps on

    L_syn = l_bn L_BN + l_ce L_CE + l_adv L_ADV + l_tv L_TV + l_l2 L_L2 + l_rca L_RCA + l_tar L_TAR

Both networks see the same random jitter (roll) and, where the data allows, the same
horizontal flip. The student (frozen, eval mode, surrogate gradients on) is only run on the
steps that need it: L_RCA and L_ADV are computed every ``student_every`` steps, always
including the last step, because a student pass costs T times a teacher-sized pass.
The generator host (generator.py) optimises the same objective through a generator;
both share :class:`Synthesizer`, which owns the objective.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError
from .objectives import RCA_VARIANTS, TeacherProbe, adversarial_loss, rca_loss, total_variation
from .teachers import Normalizer, batchnorm_layers


SYNTHESIS_METHODS = ("pixel", "generator")


@dataclass(frozen=True)
class SynthesisConfig:
    batch_size: int = 128
    steps: int = 50
    lr: float = 0.1
    beta1: float = 0.5
    beta2: float = 0.99
    # METHOD.md's l_bn = 10 left the digits teacher at chance on the batch's own labels
    # (L_CE 2.2 ~ ln 10 after 50 steps); l_bn = 1 gives confident, class-balanced batches.
    l_bn: float = 1.0
    l_ce: float = 1.0
    l_adv: float = 0.0
    l_tv: float = 1e-4
    l_l2: float = 0.0
    l_rca: float = 0.0
    l_tar: float = 0.0
    rca_variant: str = "gram"
    tar_ks: tuple[float, ...] = (1.0, 2.0)
    tar_temperature: float = 0.1
    tar_temperature_end: float | None = 0.05  # linear anneal over the steps; None = constant
    student_every: int = 10
    jitter_px: int | None = None  # None: max(1, side // 16), 2 px on 32x32
    flip: bool = True  # only used where the teacher's data allows horizontal flips
    method: str = "pixel"  # or "generator" (generator.py): what the Adam steps update
    generator_lr: float = 4e-3  # generator host: inner learning rate of the generator weights
    z_dim: int = 256  # generator host: latent size
    teacher_bf16: bool = False  # run the teacher under bfloat16 autocast (the losses stay float32)
    bn_groups: int = 1  # the batch as G independent batches for L_BN (many batches optimised at once)

    def __post_init__(self):
        for name in ("batch_size", "steps", "student_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"synthesis {name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        for name in ("lr", "l_bn", "l_ce", "l_adv", "l_tv", "l_l2", "l_rca", "l_tar"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if self.bn_groups < 1 or self.batch_size % self.bn_groups:
            raise ConfigError(f"--bn-groups {self.bn_groups} must be at least 1 and divide --batch-size "
                              f"{self.batch_size}")
        if self.method not in SYNTHESIS_METHODS:
            raise ConfigError(f"--synthesizer {self.method!r}: choose one of {', '.join(SYNTHESIS_METHODS)}")
        if self.generator_lr <= 0 or self.z_dim < 1:
            raise ConfigError("--generator-lr must be positive and the latent size at least 1")
        if self.rca_variant not in RCA_VARIANTS:
            raise ConfigError(f"--rca-variant {self.rca_variant!r}: choose one of {', '.join(RCA_VARIANTS)}")
        if self.tar_temperature <= 0:
            raise ConfigError("--tar-temperature must be positive")

    @property
    def needs_student(self) -> bool:
        return self.l_rca > 0 or self.l_adv > 0

    def to_dict(self) -> dict:
        values = asdict(self)
        values["tar_ks"] = list(self.tar_ks)
        return values


def random_jitter_flip(images: torch.Tensor, jitter_px: int, flip: bool) -> torch.Tensor:
    """Roll the batch by up to ``jitter_px`` pixels in x and y, and flip it horizontally with
    probability 1/2 (one draw for the batch, as in DeepInversion)."""
    if jitter_px > 0:
        dx, dy = torch.randint(-jitter_px, jitter_px + 1, (2,)).tolist()
        images = torch.roll(images, shifts=(dy, dx), dims=(2, 3))
    if flip and bool(torch.rand(()) < 0.5):
        images = torch.flip(images, dims=(3,))
    return images


class Synthesizer:
    """The objective L_syn on a batch, shared by both hosts: jitter/flip, the teacher with its
    BatchNorm probe (L_BN, L_TAR), L_CE, L_TV, L_L2, and the student terms (L_RCA, L_ADV) on
    the steps that need them."""

    def __init__(self, teacher: nn.Module, normalizer: Normalizer, config: SynthesisConfig,
                 num_classes: int, allow_flip: bool):
        self.teacher = teacher
        self.config = config
        self.num_classes = num_classes
        self.flip = config.flip and allow_flip
        self.low, self.high = normalizer.bounds()
        self.probe = TeacherProbe(batchnorm_layers(teacher), tuple(config.tar_ks), config.bn_groups)
        self.probe.want_tar = config.l_tar > 0

    def jitter(self, side: int) -> int:
        return self.config.jitter_px if self.config.jitter_px is not None else max(1, side // 16)

    def _tar_temperature(self, step: int) -> float:
        cfg = self.config
        if cfg.tar_temperature_end is None or cfg.steps == 1:
            return cfg.tar_temperature
        fraction = step / (cfg.steps - 1)
        return cfg.tar_temperature + fraction * (cfg.tar_temperature_end - cfg.tar_temperature)

    def objective(self, images: torch.Tensor, targets: torch.Tensor, student: nn.Module | None,
                  step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(L_syn, its terms) for ``images`` at synthesis step ``step`` of ``config.steps``."""
        cfg = self.config
        augmented = random_jitter_flip(images, self.jitter(images.shape[-1]), self.flip)
        self.probe.active = True
        self.probe.tar_temperature = self._tar_temperature(step)
        try:
            with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=cfg.teacher_bf16):
                features = self.teacher.penultimate(augmented)
                logits = self.teacher.head(features)
        finally:
            self.probe.active = False
        features, logits = features.float(), logits.float()
        bn, tar = self.probe.collect()
        terms = {"bn": bn, "ce": F.cross_entropy(logits, targets),
                 "tv": total_variation(augmented), "l2": augmented.pow(2).mean(), "tar": tar}
        if student is not None and (cfg.steps - 1 - step) % cfg.student_every == 0:
            out = student(augmented)
            if cfg.l_rca > 0:
                terms["rca"] = rca_loss(features, out.features, cfg.rca_variant)
            if cfg.l_adv > 0:
                terms["adv"] = adversarial_loss(out.logits, logits)
        loss = sum(getattr(cfg, f"l_{name}") * value for name, value in terms.items()
                   if getattr(cfg, f"l_{name}") > 0)
        return loss, terms

    @contextmanager
    def frozen_student(self, student: nn.Module | None):
        """The student in eval mode without weight gradients (surrogate gradients still reach
        the images), or None when no term needs it; restored afterwards."""
        if student is None or not self.config.needs_student:
            yield None
            return
        was_training = student.training
        grad_flags = [p.requires_grad for p in student.parameters()]
        student.eval()
        student.requires_grad_(False)
        try:
            yield student
        finally:
            for parameter, flag in zip(student.parameters(), grad_flags):
                parameter.requires_grad_(flag)
            student.train(was_training)

    def random_targets(self, device: torch.device) -> torch.Tensor:
        return torch.randint(self.num_classes, (self.config.batch_size,)).to(device)

    def state_dict(self) -> dict:
        """What a checkpoint must hold to resume this host (nothing for pixel optimisation)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class PixelSynthesizer(Synthesizer):
    """DeepInversion: Adam on the pixels of a fresh random batch for ``steps`` steps."""

    def synthesize(self, student: nn.Module | None, input_shape: tuple[int, int, int],
                   device: torch.device) -> tuple[torch.Tensor, dict[str, float]]:
        """One optimised batch (B, C, H, W) in normalised space, and the last step's loss terms."""
        cfg = self.config
        targets = self.random_targets(device)
        images = torch.randn(cfg.batch_size, *input_shape).to(device).requires_grad_(True)
        optimizer = torch.optim.Adam([images], lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
        low, high = self.low.to(device), self.high.to(device)
        terms: dict[str, torch.Tensor] = {}
        with self.frozen_student(student) as frozen:
            for step in range(cfg.steps):
                loss, terms = self.objective(images, targets, frozen, step)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                with torch.no_grad():
                    images.copy_(torch.maximum(torch.minimum(images, high), low))
        return images.detach(), {name: float(value.detach()) for name, value in terms.items()}
