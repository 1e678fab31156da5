"""The generator host (FastDFKD, Fang et al., AAAI 2022): a generator reused across batches.

Pixel optimisation starts every batch from noise and needs ~50 steps. Here a generator
G(z) learns, across batches, what the teacher's data looks like, so each batch needs only a
few steps (``config.steps``, 5 by default for this host):

    for each batch:   z ~ N(0, I) (B x z_dim);  G' <- G                    (a fast copy)
                      repeat steps times: Adam on (z, G') for L_syn(G'(z)) (synthesis.py)
                      G <- Adam step on the meta gradient, meta_lr = lr_G * steps:
                           reptile: G - G';  fomaml (first-order MAML): the sum over the
                           inner steps of the gradients of L_syn at G'

The images are mapped into the teacher's normalised pixel range by a sigmoid,
x = low + (high - low) * sigmoid(G(z)), so they need no clipping. L_syn is the same
objective as for pixel optimisation, STARS terms included. The generator and its meta
optimiser are part of the distillation checkpoint, so a resumed run continues exactly.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from stars_deploy.errors import ConfigError
from .synthesis import Synthesizer

GENERATOR_STEPS = 5  # inner steps per batch when the user gives none (FastDFKD uses 2-10)
GENERATOR_Z_LR = 0.015  # Adam learning rate of the latents (FastDFKD's CIFAR setting)
GENERATOR_WIDTH = 64  # ngf of FastDFKD's CIFAR generator
LEAKY_SLOPE = 0.2
UPSAMPLINGS = 2  # the first feature map is side / 4


class Generator(nn.Module):
    """FastDFKD's DCGAN-style generator: z -> (2w, s/4, s/4) -> two upsample-conv-BN-LeakyReLU
    stages -> conv to the image channels (pre-sigmoid)."""

    def __init__(self, z_dim: int, image_shape: tuple[int, int, int], width: int = GENERATOR_WIDTH):
        super().__init__()
        channels, height, width_px = image_shape
        factor = 2 ** UPSAMPLINGS
        if height % factor or width_px % factor:
            raise ConfigError(f"the generator host needs an input side divisible by {factor}; the teacher takes "
                              f"{height}x{width_px}: use --synthesizer pixel")
        self.start = (2 * width, height // factor, width_px // factor)
        self.project = nn.Linear(z_dim, 2 * width * self.start[1] * self.start[2])
        self.body = nn.Sequential(
            nn.BatchNorm2d(2 * width),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1, bias=False),
            nn.BatchNorm2d(2 * width),
            nn.LeakyReLU(LEAKY_SLOPE),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(2 * width, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.LeakyReLU(LEAKY_SLOPE),
            nn.Conv2d(width, channels, 3, padding=1),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.body(self.project(z).view(-1, *self.start))


class GeneratorSynthesizer(Synthesizer):
    """Meta-learned generator host; :meth:`synthesize` has the pixel host's signature."""

    def __init__(self, *args, input_shape: tuple[int, int, int], device: torch.device, **kwargs):
        super().__init__(*args, **kwargs)
        cfg = self.config
        self.generator = Generator(cfg.z_dim, input_shape).to(device).train()
        self.low, self.high = self.low.to(device), self.high.to(device)
        # the meta (outer) step: FastDFKD scales its learning rate by the inner steps
        self.meta_optimizer = torch.optim.Adam(self.generator.parameters(), lr=cfg.generator_lr * cfg.steps,
                                               betas=(cfg.beta1, 0.999))

    def _to_images(self, raw: torch.Tensor) -> torch.Tensor:
        return self.low + (self.high - self.low) * torch.sigmoid(raw)

    def synthesize(self, student: nn.Module | None, input_shape: tuple[int, int, int],
                   device: torch.device) -> tuple[torch.Tensor, dict[str, float]]:
        """One batch (B, C, H, W) in normalised space from ``steps`` inner steps, then the
        meta update of the generator; and the last step's loss terms."""
        cfg = self.config
        targets = self.random_targets(device)
        z = torch.randn(cfg.batch_size, cfg.z_dim, device=device).requires_grad_(True)
        fast = copy.deepcopy(self.generator)
        optimizer = torch.optim.Adam([{"params": fast.parameters()}, {"params": [z], "lr": cfg.lr}],
                                     lr=cfg.generator_lr, betas=(cfg.beta1, 0.999))
        terms: dict[str, torch.Tensor] = {}
        with self.frozen_student(student) as frozen:
            for step in range(cfg.steps):
                images = self._to_images(fast(z))
                loss, terms = self.objective(images, targets, frozen, step)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.generator_meta == "fomaml":  # first order MAML: the fast copy's gradients, summed
                    for slow, quick in zip(self.generator.parameters(), fast.parameters()):
                        slow.grad = quick.grad.clone() if slow.grad is None else slow.grad.add_(quick.grad)
                optimizer.step()
        with torch.no_grad():
            images = self._to_images(fast(z))  # the images of the last update
        if cfg.generator_meta == "reptile":
            for slow, quick in zip(self.generator.parameters(), fast.parameters()):
                slow.grad = slow.detach() - quick.detach()
        self.meta_optimizer.step()
        self.meta_optimizer.zero_grad(set_to_none=True)
        self.probe.end_batch()
        for slow, quick in zip(self.generator.buffers(), fast.buffers()):
            slow.copy_(quick)  # BatchNorm running statistics (unused in training mode)
        return images, {name: float(value.detach()) for name, value in terms.items()}

    def state_dict(self) -> dict:
        return {**super().state_dict(), "generator": self.generator.state_dict(),
                "meta_optimizer": self.meta_optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.generator.load_state_dict(state["generator"])
        self.meta_optimizer.load_state_dict(state["meta_optimizer"])
