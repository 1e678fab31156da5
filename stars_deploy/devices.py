"""``--device``: one meaning for every command (auto, cpu, cuda, cuda:N)."""

from __future__ import annotations

import torch

from .errors import ConfigError

DEVICE_CHOICES = ("auto", "cpu", "cuda")  # or cuda:N
DEFAULT_DEVICE = "auto"


def resolve_device(name: str) -> torch.device:
    """``auto``: the first GPU when CUDA is available, else the CPU. ``cuda`` or ``cuda:N``
    without CUDA (or without GPU N) is a ConfigError saying what to use instead."""
    name = str(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name != "cuda" and not (name.startswith("cuda:") and name[5:].isdigit()):
        raise ConfigError(f"--device {name!r}: use auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: CUDA is not available on this machine; use --device cpu or auto")
    if name.startswith("cuda:") and int(name[5:]) >= torch.cuda.device_count():
        raise ConfigError(f"--device {name}: this machine has {torch.cuda.device_count()} GPU(s); "
                          f"use cuda:0..cuda:{torch.cuda.device_count() - 1}")
    return torch.device(name)


def fast_bf16(name: str) -> bool:
    """Whether bfloat16 arithmetic is native on ``--device name`` (a GPU that supports it, or a
    CPU with AVX512-BF16 or AMX), so that bf16 autocast speeds training up instead of slowing it."""
    device = resolve_device(name)
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, check, lambda: False)() for check in checks)
