"""Pixel-optimisation host (DeepInversion) with the STARS terms plugged in.

One call of :meth:`PixelSynthesizer.synthesize` optimises a batch of B images, in the
teacher's normalised input space, for ``steps`` Adam steps on

    L_syn = l_bn L_BN + l_ce L_CE + l_adv L_ADV + l_tv L_TV + l_l2 L_L2 + l_rca L_RCA + l_tar L_TAR

Both networks see the same random jitter (roll) and, where the data allows, the same
horizontal flip. The student (frozen, eval mode, surrogate gradients on) is only run on the
steps that need it: L_RCA and L_ADV are computed every ``student_every`` steps, always
including the last step, because a student pass costs T times a teacher-sized pass.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError
from .objectives import RCA_VARIANTS, TeacherProbe, adversarial_loss, rca_loss, total_variation
from .teachers import Normalizer, batchnorm_layers


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

    def __post_init__(self):
        for name in ("batch_size", "steps", "student_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"synthesis {name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        for name in ("lr", "l_bn", "l_ce", "l_adv", "l_tv", "l_l2", "l_rca", "l_tar"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
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


class PixelSynthesizer:
    """Optimises synthetic batches against a frozen teacher (and, for RCA/ADV, the student)."""

    def __init__(self, teacher: nn.Module, normalizer: Normalizer, config: SynthesisConfig,
                 num_classes: int, allow_flip: bool):
        self.teacher = teacher
        self.config = config
        self.num_classes = num_classes
        self.flip = config.flip and allow_flip
        self.low, self.high = normalizer.bounds()
        self.probe = TeacherProbe(batchnorm_layers(teacher), tuple(config.tar_ks))
        self.probe.want_tar = config.l_tar > 0

    def jitter(self, side: int) -> int:
        return self.config.jitter_px if self.config.jitter_px is not None else max(1, side // 16)

    def _tar_temperature(self, step: int) -> float:
        cfg = self.config
        if cfg.tar_temperature_end is None or cfg.steps == 1:
            return cfg.tar_temperature
        fraction = step / (cfg.steps - 1)
        return cfg.tar_temperature + fraction * (cfg.tar_temperature_end - cfg.tar_temperature)

    def synthesize(self, student: nn.Module | None, input_shape: tuple[int, int, int],
                   device: torch.device) -> tuple[torch.Tensor, dict[str, float]]:
        """One optimised batch (B, C, H, W) in normalised space, and the last step's loss terms."""
        cfg = self.config
        targets = torch.randint(self.num_classes, (cfg.batch_size,)).to(device)
        images = torch.randn(cfg.batch_size, *input_shape).to(device).requires_grad_(True)
        optimizer = torch.optim.Adam([images], lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
        low, high = self.low.to(device), self.high.to(device)
        use_student = student is not None and cfg.needs_student
        if use_student:
            was_training = student.training
            student.eval()
            grad_flags = [p.requires_grad for p in student.parameters()]
            student.requires_grad_(False)
        jitter = self.jitter(input_shape[-1])
        terms: dict[str, torch.Tensor] = {}
        try:
            for step in range(cfg.steps):
                augmented = random_jitter_flip(images, jitter, self.flip)
                self.probe.active = True
                self.probe.tar_temperature = self._tar_temperature(step)
                features = self.teacher.penultimate(augmented)
                logits = self.teacher.head(features)
                self.probe.active = False
                bn, tar = self.probe.collect()
                terms = {"bn": bn, "ce": F.cross_entropy(logits, targets),
                         "tv": total_variation(augmented), "l2": augmented.pow(2).mean(), "tar": tar}
                if use_student and (cfg.steps - 1 - step) % cfg.student_every == 0:
                    out = student(augmented)
                    if cfg.l_rca > 0:
                        terms["rca"] = rca_loss(features, out.features, cfg.rca_variant)
                    if cfg.l_adv > 0:
                        terms["adv"] = adversarial_loss(out.logits, logits)
                loss = sum(getattr(cfg, f"l_{name}") * value for name, value in terms.items()
                           if getattr(cfg, f"l_{name}") > 0)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                with torch.no_grad():
                    images.copy_(torch.maximum(torch.minimum(images, high), low))
        finally:
            self.probe.active = False
            if use_student:
                for parameter, flag in zip(student.parameters(), grad_flags):
                    parameter.requires_grad_(flag)
                student.train(was_training)
        return images.detach(), {name: float(value.detach()) for name, value in terms.items()}
