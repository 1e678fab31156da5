"""Atomic writes and safe reads: nothing half-written is ever left under its final name.

A write goes to a temporary file ``.NAME.<random>.tmp`` beside its target, is fsync'ed and
then renamed over ``NAME`` (one atomic rename on POSIX). A process killed mid-write leaves
only that temporary file, which :func:`remove_orphans` deletes when the directory is next
opened. A full disk (ENOSPC, or a quota: EDQUOT) is one :class:`DiskFullError` naming the
file and the bytes it needed; the previous version of the file stays as it was.
"""

from __future__ import annotations

import errno
import io
import json
import os
import re
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import CheckpointError, StarsDeployError
from .units import binary_size

TMP_SUFFIX = ".tmp"
NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


class DiskFullError(StarsDeployError):
    """A write that found no space: the message names the file and the bytes it needed."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _no_space(path: Path, needed: int, existed: bool) -> DiskFullError:
    try:
        free = f", {binary_size(shutil.disk_usage(path.parent).free)} free"
    except OSError:
        free = ""
    kept = f"{path} keeps its previous version" if existed else f"no partial {path.name} was left"
    return DiskFullError(f"no space left to write {path} ({binary_size(needed)} needed{free}); nothing was "
                         f"lost: {kept}. Free some space and run the command again")


def _atomic_write(path: Path, data: bytes) -> None:
    """``data`` to ``path`` through a temporary file, fsync and rename; on a full disk the
    temporary file is removed and a DiskFullError raised (before writing, when the free space
    is already known to be too small)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    existed = path.exists()
    try:
        if shutil.disk_usage(path.parent).free < len(data):
            raise _no_space(path, len(data), existed)
    except OSError:
        pass  # no statvfs here: the write itself will tell
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # the mode a plain open() would give, not mkstemp's 0600
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        if exc.errno in NO_SPACE_ERRNOS:
            raise _no_space(path, len(data), existed) from None
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def remove_orphans(directory: Path, older_than_s: float = 0.0) -> list[Path]:
    """Delete the temporary files ``.NAME.*.tmp`` that a process killed mid-write left in
    ``directory`` (not recursive), if their last change is ``older_than_s`` seconds ago or more
    (a live writer keeps touching its own); returns what was removed."""
    directory, removed = Path(directory), []
    if not directory.is_dir():
        return removed
    now = time.time()
    for candidate in directory.glob(f".*{TMP_SUFFIX}"):
        try:
            if candidate.is_file() and now - candidate.stat().st_mtime >= older_than_s:
                candidate.unlink()
                removed.append(candidate)
        except FileNotFoundError:  # its writer renamed or removed it meanwhile
            continue
    return removed


def write_json(path: Path, payload: Any) -> None:
    """Write ``payload`` as indented JSON to ``path`` atomically."""
    text = json.dumps(payload, indent=2, sort_keys=True) + "\n"
    _atomic_write(path, text.encode())


def write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    _atomic_write(path, bytes(data))


def save_torch(path: Path, payload: Any) -> None:
    """``torch.save`` to ``path`` atomically (temporary file, fsync, rename). The payload is
    serialised in memory first, so its size is known before anything touches the disk and a
    full disk never surfaces as torch's own zip-writer error."""
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    _atomic_write(path, buffer.getvalue())


def _missing(path: Path, what: str) -> CheckpointError | None:
    """The error for a path that is not a readable file, or None when it is one."""
    if path.is_dir():
        return CheckpointError(f"{what} {path} is a directory, not a file: give the file's path")
    if not path.exists():
        return CheckpointError(f"{what} {path} does not exist: check the path")
    if not path.is_file():
        return CheckpointError(f"{what} {path} is not a regular file: give the file's path")
    return None


# torch's weights-only refusal names the offending global in one line, inside advice that
# suggests weights_only=False: we keep the name and never repeat the advice
_UNSAFE_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")


def _one_line(text: str) -> str:
    """The first sentence of a library's error, without ANSI codes, on one line."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", text).strip()
    first = text.splitlines()[0] if text else ""
    return first.split(". ")[0].rstrip(".")


def load_torch(path: Path, what: str = "checkpoint") -> Any:
    """Load a torch file with ``weights_only=True``: tensors and plain containers only, no code.

    Raises CheckpointError naming the file when it is missing, a directory, truncated, not a
    torch file, or holds anything but tensors and plain containers (never suggesting to load
    it with weights_only=False).
    """
    path = Path(path)
    problem = _missing(path, what)
    if problem is not None:
        raise problem
    try:
        with warnings.catch_warnings():
            # e.g. "Detected pickle protocol 4": one more stderr line for a file that loads or fails anyway
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # the weights-only unpickler runs no code, so any failure is the file's
        unsafe = _UNSAFE_GLOBAL.search(str(exc))
        if unsafe:
            raise CheckpointError(
                f"refusing to load {what} {path}: it holds more than tensors and plain containers "
                f"(global {unsafe.group(1)}), and it was not run; save a state_dict instead") from None
        reason = _one_line(str(exc))
        if not reason or "Weights only load failed" in reason:
            detail = re.search(r"WeightsUnpickler error:\s*(.+)", str(exc))
            reason = _one_line(detail.group(1)) if detail else ""
        reason = f"{type(exc).__name__}: {reason}" if reason else type(exc).__name__
        raise CheckpointError(
            f"cannot read {what} {path}: the file is truncated, corrupt or not a PyTorch "
            f"checkpoint ({reason}); re-save or re-download it"
        ) from None


def read_json(path: Path, what: str = "file") -> Any:
    """Read JSON, naming the file in the error when it is missing, a directory or malformed."""
    path = Path(path)
    problem = _missing(path, what)
    if problem is not None:
        raise problem
    try:
        text = path.read_bytes().decode("utf8")
    except UnicodeDecodeError as exc:
        raise CheckpointError(f"{what} {path} is not JSON text (byte {exc.start} is not UTF-8: a binary file?); "
                              "give the JSON file the command wrote, or re-run that command") from None
    try:
        return json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise CheckpointError(f"{what} {path} is not valid JSON ({_one_line(str(exc)) or type(exc).__name__}); "
                              "re-run the command that wrote it") from None


def _strip_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if state and all(key.startswith("module.") for key in state):
        return {key[len("module."):]: value for key, value in state.items()}
    return state


def fit_state_dict(model: nn.Module, state: dict, source: str) -> None:
    """Load ``state`` into ``model`` strictly, tolerating a ``module.`` prefix and missing
    ``num_batches_tracked``; otherwise raise one CheckpointError listing every problem."""
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{source} holds no state_dict of tensors")
    state = _strip_prefix(state)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    misshaped = [f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}"
                 for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if missing or unexpected or misshaped:
        def show(items):
            return ", ".join(items[:6]) + (f" (+{len(items) - 6} more)" if len(items) > 6 else "") or "none"
        raise CheckpointError(
            f"{source} does not fit {type(model).__name__}: missing keys: {show(missing)}; "
            f"unexpected keys: {show(unexpected)}; mis-shaped keys: {show(misshaped)}. "
            "Check --teacher/--num-classes against the checkpoint")
    model.load_state_dict(state, strict=False)
