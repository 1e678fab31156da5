"""The synthesis objective, and the pixel-optimisation host (DeepInversion) it plugs into.

One call of :meth:`PixelSynthesizer.synthesize` optimises a batch of B images, in the
teacher's normalised input space, for ``steps`` Adam steps on

    L_syn = l_bn L_BN + l_ce L_CE + l_adv L_ADV + l_tv L_TV + l_l2 L_L2 + l_rca L_RCA + l_tar L_TAR
            + l_tar_student L_TAR^S

Both networks see the same random jitter (roll) and, where the data allows, the same
horizontal flip. The student (frozen, eval mode, surrogate gradients on) is only run on the
steps that need it: L_RCA, L_ADV and L_TAR^S (the student-tail variant) are computed every
``student_every`` steps, always including the last step, because a student pass costs T
times a teacher-sized pass.
The generator host (generator.py) optimises the same objective through a generator;
both share :class:`Synthesizer`, which owns the objective.

With ``compile`` set, the teacher side of the objective (the teacher pass with its BatchNorm
hooks, L_BN, L_TAR, L_CE, L_TV, L_L2; forward and backward) is one torch.compile'd graph:
on the CPU, a ResNet-20 teacher at B 64 runs 4.8 -> 12.6 synthesis iterations/s after a
~65 s compilation (benchmarks/README.md).
``reduce-overhead`` also replays it as CUDA graphs on a GPU (on the CPU it is ``default``).
The jitter, the student terms and the optimiser step stay eager.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from stars_deploy.errors import ConfigError
from .objectives import (RCA_VARIANTS, StudentProbe, TeacherProbe, adversarial_loss, rca_loss, student_tail_loss,
                         total_variation)
from stars_deploy.teachers import Normalizer, batchnorm_layers


SYNTHESIS_METHODS = ("pixel", "generator")
GENERATOR_META = ("reptile", "fomaml")
COMPILE_MODES = ("none", "default", "reduce-overhead")  # torch.compile's modes, or eager
INITS = ("noise", "smooth")  # where pixel optimisation starts (random_start)
SMOOTH_DOWNSCALE = 4  # "smooth": N(0, 1) noise at 1/4 of the side, upsampled bilinearly


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
    l_tar_student: float = 0.0  # METHOD.md's student-tail variant of TAR (objectives.student_tail_loss)
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
    generator_meta: str = "reptile"  # generator host's meta gradient: reptile or fomaml (generator.py)
    teacher_bf16: bool = False  # run the teacher under bfloat16 autocast (the losses stay float32)
    bn_groups: int = 1  # the batch as G independent batches for L_BN (many batches optimised at once)
    bn_momentum: float = 0.0  # FastDFKD's BN momentum: L_BN on each batch blended with earlier ones
    compile: str = "none"  # torch.compile mode of the teacher side of the objective (COMPILE_MODES)
    init: str = "noise"  # pixel host's starting images (INITS; random_start)

    def __post_init__(self):
        for name in ("batch_size", "steps", "student_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"synthesis {name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        for name in ("lr", "l_bn", "l_ce", "l_adv", "l_tv", "l_l2", "l_rca", "l_tar", "l_tar_student"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if self.bn_groups < 1 or self.batch_size % self.bn_groups:
            raise ConfigError(f"--bn-groups {self.bn_groups} must be at least 1 and divide --batch-size "
                              f"{self.batch_size}")
        if self.method not in SYNTHESIS_METHODS:
            raise ConfigError(f"--synthesizer {self.method!r}: choose one of {', '.join(SYNTHESIS_METHODS)}")
        if self.generator_meta not in GENERATOR_META:
            raise ConfigError(f"--generator-meta {self.generator_meta!r}: choose one of {', '.join(GENERATOR_META)}")
        if self.generator_lr <= 0 or self.z_dim < 1:
            raise ConfigError("--generator-lr must be positive and the latent size at least 1")
        if not 0 <= self.bn_momentum < 1:
            raise ConfigError(f"--bn-momentum must be in [0, 1), got {self.bn_momentum}")
        if self.compile not in COMPILE_MODES:
            raise ConfigError(f"--compile-synthesis {self.compile!r}: choose one of {', '.join(COMPILE_MODES)}")
        if self.init not in INITS:
            raise ConfigError(f"--synthesis-init {self.init!r}: choose one of {', '.join(INITS)}")
        if self.rca_variant not in RCA_VARIANTS:
            raise ConfigError(f"--rca-variant {self.rca_variant!r}: choose one of {', '.join(RCA_VARIANTS)}")
        if self.tar_temperature <= 0:
            raise ConfigError("--tar-temperature must be positive")

    @property
    def needs_student(self) -> bool:
        return self.l_rca > 0 or self.l_adv > 0 or self.l_tar_student > 0

    def to_dict(self) -> dict:
        values = asdict(self)
        values["tar_ks"] = list(self.tar_ks)
        return values


def random_start(batch: int, input_shape: tuple[int, int, int], init: str, device) -> torch.Tensor:
    """The images pixel optimisation starts from, in normalised space: N(0, 1) per pixel
    (``noise``), or N(0, 1) at 1/SMOOTH_DOWNSCALE of the side upsampled bilinearly
    (``smooth``: measured on CIFAR-10, 200 steps from smooth starts gave better batches than
    from noise, benchmarks/README.md)."""
    channels, height, width = input_shape
    if init == "noise":
        return torch.randn(batch, channels, height, width, device=device)
    coarse = torch.randn(batch, channels, max(1, height // SMOOTH_DOWNSCALE), max(1, width // SMOOTH_DOWNSCALE),
                         device=device)
    return F.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)


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
        self.probe = TeacherProbe(batchnorm_layers(teacher), tuple(config.tar_ks), config.bn_groups,
                                  config.bn_momentum)
        self.probe.want_tar = config.l_tar > 0
        self.probe.want_rates = config.l_tar_student > 0
        self._temperatures: torch.Tensor | None = None
        self._compiled = (torch.compile(self._teacher_terms, mode=config.compile)
                          if config.compile != "none" else None)

    def jitter(self, side: int) -> int:
        return self.config.jitter_px if self.config.jitter_px is not None else max(1, side // 16)

    def _tar_temperature(self, step: int, device: torch.device) -> torch.Tensor:
        """TAR's temperature at ``step``, annealed linearly over the steps: a 0-d tensor on the
        device, from a schedule made once, so a compiled objective sees the same input each
        step (a Python float would compile a second graph) and nothing is copied per step."""
        cfg = self.config
        if self._temperatures is None or self._temperatures.device != device:
            end = cfg.tar_temperature if cfg.tar_temperature_end is None else cfg.tar_temperature_end
            self._temperatures = torch.linspace(cfg.tar_temperature, end, cfg.steps).to(device)
        return self._temperatures[step]

    def objective(self, images: torch.Tensor, targets: torch.Tensor, student: nn.Module | None,
                  step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(L_syn, its terms) for ``images`` at synthesis step ``step`` of ``config.steps``."""
        cfg = self.config
        augmented = random_jitter_flip(images, self.jitter(images.shape[-1]), self.flip)
        if self._compiled is not None and cfg.compile == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()  # the previous step's graph outputs are dead
        try:
            temperature = self._tar_temperature(step, images.device)
            features, logits, terms, teacher_rates = self._teacher_side(augmented, targets, temperature)
        finally:
            self.probe.active = False
        if student is not None and (cfg.steps - 1 - step) % cfg.student_every == 0:
            neurons = StudentProbe(student) if cfg.l_tar_student > 0 else None  # hooks only where measured
            with neurons or nullcontext():
                out = student(augmented)
            if neurons is not None:
                if not neurons.currents:
                    raise ConfigError("--l-tar-student: the student ran no LIF layer (or rate activation) that "
                                      "can be measured; leave the option out for this student")
                terms["tar_student"] = student_tail_loss(neurons.currents, neurons.firing_currents, teacher_rates,
                                                         temperature)
            if cfg.l_rca > 0:
                terms["rca"] = rca_loss(features, out.features, cfg.rca_variant)
            if cfg.l_adv > 0:
                terms["adv"] = adversarial_loss(out.logits, logits)
        loss = sum(getattr(cfg, f"l_{name}") * value for name, value in terms.items()
                   if getattr(cfg, f"l_{name}") > 0)
        return loss, terms

    def _teacher_side(self, augmented: torch.Tensor, targets: torch.Tensor, tar_temperature: torch.Tensor):
        """The compiled teacher side when ``compile`` asks for it and the compiler works here;
        otherwise (or after a compiler failure, with a warning) the eager one."""
        if self._compiled is not None:
            try:
                return self._compiled(augmented, targets, tar_temperature)
            except Exception as exc:  # no working compiler here: eager computes the same terms
                self._compiled = None
                warnings.warn(f"torch.compile of the synthesis objective failed ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''}); running it eagerly",
                              RuntimeWarning)
                self.probe.collect()  # drop what a half-run graph left in the probe
        return self._teacher_terms(augmented, targets, tar_temperature)

    def _teacher_terms(self, augmented: torch.Tensor, targets: torch.Tensor, tar_temperature: torch.Tensor):
        """(teacher features, teacher logits, {bn, ce, tv, l2, tar}, the teacher's ReLU rates per
        BatchNorm layer) for the augmented batch: everything of L_syn that does not need the
        student (one graph under torch.compile)."""
        self.probe.active = True
        self.probe.tar_temperature = tar_temperature
        with torch.autocast(augmented.device.type, dtype=torch.bfloat16, enabled=self.config.teacher_bf16):
            features = self.teacher.penultimate(augmented)
            logits = self.teacher.head(features)
        self.probe.active = False
        features, logits = features.float(), logits.float()
        bn, tar, rates = self.probe.collect()
        return features, logits, {"bn": bn, "ce": F.cross_entropy(logits, targets), "tv": total_variation(augmented),
                                  "l2": augmented.pow(2).mean(), "tar": tar}, rates

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
        return torch.randint(self.num_classes, (self.config.batch_size,), device=device)

    def state_dict(self) -> dict:
        """What a checkpoint must hold to resume this host: the BN momentum's history."""
        return {"bn_history": self.probe.history}

    def load_state_dict(self, state: dict) -> None:
        device = next(self.teacher.parameters()).device  # a checkpoint's tensors come back on the CPU
        self.probe.history = [None if stats is None else tuple(t.to(device) for t in stats)
                              for stats in state.get("bn_history", self.probe.history)]


class PixelSynthesizer(Synthesizer):
    """DeepInversion: Adam on the pixels of a fresh random batch for ``steps`` steps."""

    def synthesize(self, student: nn.Module | None, input_shape: tuple[int, int, int],
                   device: torch.device) -> tuple[torch.Tensor, dict[str, float]]:
        """One optimised batch (B, C, H, W) in normalised space, and the last step's loss terms."""
        cfg = self.config
        targets = self.random_targets(device)
        images = random_start(cfg.batch_size, input_shape, cfg.init, device).requires_grad_(True)
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
        self.probe.end_batch()
        return images.detach(), {name: float(value.detach()) for name, value in terms.items()}
