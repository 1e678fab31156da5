"""How much memory there is, and what a model will ask for, found out before allocating it.

Models are counted on PyTorch's ``meta`` device: modules built there have shapes but no
storage, so the parameters of a 10^13-weight student are counted in milliseconds. The
activations of a layer stack are the sum of its leaf modules' output sizes for one sample,
from one forward pass: on the CPU with real (throw-away) weights when they are small
(REAL_PASS_BYTES; the first meta-device forward of a process costs ~2 s of tracing set-up,
a real one of a small model milliseconds), else on the meta device, which computes shapes only.

Available memory: on the CPU, Linux's ``MemAvailable`` (what can be allocated without
swapping), lowered to the cgroup limit when the process runs under one; on CUDA, the free
memory ``torch.cuda.mem_get_info`` reports. Where neither is known, nothing is refused.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .errors import ConfigError
from .units import binary_size

MEMINFO = Path("/proc/meminfo")
REAL_PASS_BYTES = 64 * 2**20  # models up to this size are measured by a real forward pass
CGROUP_LIMIT, CGROUP_USAGE = Path("/sys/fs/cgroup/memory.max"), Path("/sys/fs/cgroup/memory.current")


def _meminfo_available() -> int | None:
    try:
        for line in MEMINFO.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024  # the file says kB and means KiB
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _cgroup_room() -> int | None:
    try:
        limit = CGROUP_LIMIT.read_text().strip()
        return None if limit == "max" else int(limit) - int(CGROUP_USAGE.read_text().strip())
    except (OSError, ValueError):
        return None


def available_bytes(device: torch.device) -> int | None:
    """Bytes that can still be allocated on ``device`` now; None when unknown."""
    if device.type == "cuda":
        try:
            return int(torch.cuda.mem_get_info(device)[0])
        except (RuntimeError, AssertionError):
            return None
    if device.type != "cpu":
        return None
    known = [room for room in (_meminfo_available(), _cgroup_room()) if room is not None]
    return min(known) if known else None


def on_meta(build: Callable[[], nn.Module]) -> nn.Module:
    """``build()`` on the meta device: the shapes of a model without its storage."""
    with torch.device("meta"):
        return build()


def parameter_count(model: nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


def activation_elements(build: Callable[[], nn.Module], input_shape: tuple[int, ...]) -> int:
    """Elements of every leaf module's output(s) for one sample of ``input_shape``: what a
    training pass keeps at least once for its backward. ``build`` makes the model."""
    model = on_meta(build)
    if parameter_count(model) * 4 <= REAL_PASS_BYTES:
        model = build()
    device = next(model.parameters(), torch.empty(0)).device
    counted: list[int] = []

    def count(module, inputs, output):
        outputs = output if isinstance(output, (tuple, list)) else (output,)
        counted.append(sum(o.numel() for o in outputs if isinstance(o, torch.Tensor)))

    hooks = [m.register_forward_hook(count) for m in model.modules() if not list(m.children())]
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, *input_shape, device=device))
    finally:
        for hook in hooks:
            hook.remove()
    return sum(counted)


def require(needed: int, device: torch.device, what: str, advice: str, parts: dict[str, int] | None = None,
            share: int = 1) -> None:
    """A ConfigError when ``needed`` bytes exceed what ``device`` has free (divided among
    ``share`` processes on one machine), saying how much is needed, of what, and ``advice``."""
    available = available_bytes(device)
    if available is None or needed <= available // share:
        return
    detail = ", ".join(f"{name} {binary_size(size)}" for name, size in (parts or {}).items() if size)
    room = f"{binary_size(available)} available on {device}" + (f" for {share} processes" if share > 1 else "")
    raise ConfigError(f"{what} needs at least {binary_size(needed)} of memory"
                      f"{' (' + detail + ')' if detail else ''}, {room}: {advice}")
