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
