"""The training augmentation of the KD minibatches (METHOD.md: random crop with padding, flip)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


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


MIX_MODES = ("none", "mixup", "cutmix", "both")


def mix_batch(images: torch.Tensor, mode: str, alpha: float = 1.0) -> torch.Tensor:
    """Mix every image with another of the batch (a random permutation): ``mixup`` blends the
    two with a Beta(alpha, alpha) weight per image, ``cutmix`` pastes a random box of the other
    (area 1 - lambda), ``both`` does mixup on the first half of the batch and cutmix on the
    second. The teacher labels the mixed view, so no labels are mixed. Drawn on the device."""
    if mode == "none":
        return images
    batch, device = images.shape[0], images.device
    partner = images[torch.randperm(batch, device=device)]
    beta = torch.distributions.Beta(torch.tensor(alpha, device=device), torch.tensor(alpha, device=device))
    lam = beta.sample((batch,))
    mixed = lam.view(-1, 1, 1, 1) * images + (1 - lam.view(-1, 1, 1, 1)) * partner
    if mode == "mixup":
        return mixed
    height, width = images.shape[-2:]
    cut_h, cut_w = (height * (1 - lam).sqrt()).long(), (width * (1 - lam).sqrt()).long()
    center_y = torch.randint(height, (batch,), device=device)
    center_x = torch.randint(width, (batch,), device=device)
    rows = torch.arange(height, device=device).view(1, -1, 1)
    cols = torch.arange(width, device=device).view(1, 1, -1)
    top, bottom = (center_y - cut_h // 2).view(-1, 1, 1), (center_y + cut_h // 2).view(-1, 1, 1)
    left, right = (center_x - cut_w // 2).view(-1, 1, 1), (center_x + cut_w // 2).view(-1, 1, 1)
    box = ((rows >= top) & (rows < bottom) & (cols >= left) & (cols < right)).unsqueeze(1)
    cut = torch.where(box, partner, images)
    if mode == "cutmix":
        return cut
    half = batch // 2
    return torch.cat([mixed[:half], cut[half:]])
