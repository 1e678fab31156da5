"""Inputs given explicitly: how a batch's shape says "the same every step" or "one per step",
and the ``--inputs FILE.npz`` file that carries them.

Shapes are never guessed from sizes alone. For a network whose input is ``shape`` (no batch
dimension):

- ``(B, *shape)``: B samples, each the same at every step (direct encoding);
- ``(T, B, *shape)``: B samples, step t of each at ``[t]`` (a batch of one is ``(T, 1, *shape)``).

An exact ``*shape`` decides. Otherwise ``(B, ...)`` with prod(shape) values per sample is
constant and ``(T, B, N)`` with N = prod(shape) a sequence; when a shape could be read both
ways (``(T, 1, N)``), the caller must say which with ``sequence=True/False``.

``--inputs FILE.npz`` (numpy's ``np.savez``, read with ``allow_pickle=False``), exactly one of

- ``inputs``: ``(N, *shape)``, N samples, each the same at every one of the T steps;
- ``sequences``: ``(N, T, *shape)``, N samples of T steps each (a spike train or a graded
  input per step);

sample-major so that samples can be batched, numbers, finite, given as the file takes them
(normalised for a stars-deploy file: no normalisation is applied); and optionally

- ``labels``: ``(N,)`` integers ``0..K-1``, for the accuracy.

For a netx file from another tool the inputs are integers: a file that starts with an input
layer takes them as that layer's synaptic input ``a_in`` (graded, -32768..32767: Lava's a_in
port is 16-bit); a file whose first layer is a synapse takes them as spikes (0 or 1) into it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from stars_deploy.errors import DataError

INPUTS_KEY, SEQUENCES_KEY, LABELS_KEY = "inputs", "sequences", "labels"
MAX_INPUT_VALUES = 1 << 31  # numbers in one --inputs file: bounds what a run allocates


def split_inputs(inputs: torch.Tensor, shape: tuple[int, ...], source: str, sequence: bool | None = None
                 ) -> tuple[torch.Tensor, bool]:
    """(inputs reshaped to (B, *shape) or (T, B, *shape), whether it is a sequence).

    An exact trailing shape decides; otherwise (B, anything of prod(shape) values) is constant
    and (T, B, prod(shape)) a sequence. Raises DataError naming ``source`` when the shape fits
    neither form, or both (then ``sequence`` must say which)."""
    shape = tuple(int(s) for s in shape)
    size = int(np.prod(shape))
    dims = tuple(int(s) for s in inputs.shape)
    constant = len(dims) >= 2 and dims[1:] == shape
    stepped = len(dims) >= 3 and dims[2:] == shape
    if not (constant or stepped):
        constant = len(dims) >= 2 and int(np.prod(dims[1:])) == size
        stepped = len(dims) == 3 and dims[2] == size
    if sequence is None:
        if constant and stepped:
            raise DataError(f"{source}: inputs of shape {list(dims)} read both as {dims[0]} samples and as "
                            f"{dims[0]} steps of {dims[1]} sample(s) of {list(shape)}: give the full shape, or say "
                            "which (sequence=True for (T, B, ...), False for (B, ...))")
        sequence = stepped
    if (sequence and not stepped) or (not sequence and not constant):
        form = "(T, B, " if sequence else "(B, "
        raise DataError(f"{source}: the input takes {list(shape)} per sample and step; got inputs of shape "
                        f"{list(dims)}: give {form}{', '.join(map(str, shape))})")
    leading = dims[:2] if sequence else dims[:1]
    return inputs.reshape(*leading, *shape), bool(sequence)


@dataclass
class InputFile:
    """The contents of an ``--inputs`` file: sample-major inputs, optional labels."""

    inputs: torch.Tensor  # (N, *shape), or (N, T, *shape) when ``sequence``
    labels: torch.Tensor | None
    name: str
    sequence: bool

    def subset(self, samples: int | None) -> "InputFile":
        if samples is None:
            return self
        labels = None if self.labels is None else self.labels[:samples]
        return InputFile(self.inputs[:samples], labels, f"{self.name}[:{samples}]", self.sequence)

    def batch(self, batch: torch.Tensor) -> torch.Tensor:
        """A sample-major slice as runners take it: (B, ...) or (T, B, ...)."""
        return batch.transpose(0, 1) if self.sequence else batch


def read_inputs(path: Path) -> InputFile:
    """Read and check an ``--inputs`` .npz file (never unpickled)."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"--inputs {path} is a directory: give the .npz file")
    if not path.is_file():
        raise DataError(f"--inputs {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as archive:
            keys = [key for key in (INPUTS_KEY, SEQUENCES_KEY) if key in archive.files]
            if len(keys) != 1:
                raise DataError(f"--inputs {path} needs exactly one of '{INPUTS_KEY}' (N, ...) and '{SEQUENCES_KEY}' "
                                f"(N, T, ...) (it has: {', '.join(archive.files) or 'nothing'}); save it with "
                                "np.savez(path, inputs=..., labels=...)")
            sequence = keys[0] == SEQUENCES_KEY
            inputs = archive[keys[0]]
            labels = archive[LABELS_KEY] if LABELS_KEY in archive.files else None
    except DataError:
        raise
    except Exception as exc:  # zipfile, pickle refusal (object arrays), truncation
        raise DataError(f"cannot read --inputs {path} as a .npz of numbers ({type(exc).__name__}: {exc})") from None
    key = keys[0]
    if (inputs.dtype.kind not in "biuf" or inputs.ndim < 2 + sequence or min(inputs.shape) < 1
            or inputs.size > MAX_INPUT_VALUES):
        raise DataError(f"--inputs {path}: '{key}' must be a numeric {'(N, T, ...)' if sequence else '(N, ...)'} "
                        f"array with N >= 1, got {inputs.dtype} {list(inputs.shape)}")
    if inputs.dtype.kind == "f" and not np.all(np.isfinite(inputs)):
        raise DataError(f"--inputs {path}: '{key}' holds NaN or Inf")
    if labels is not None:
        if labels.dtype.kind not in "iu" or labels.shape != (inputs.shape[0],) or (labels.size and labels.min() < 0):
            raise DataError(f"--inputs {path}: '{LABELS_KEY}' must be {inputs.shape[0]} non-negative integers "
                            f"(one per sample), got {labels.dtype} {list(labels.shape)}")
        labels = torch.from_numpy(labels.astype(np.int64))
    dtype = torch.float64 if inputs.dtype.kind == "f" and inputs.dtype.itemsize > 4 else torch.float32
    if inputs.dtype.kind in "biu":
        dtype = torch.int64
    return InputFile(torch.from_numpy(np.ascontiguousarray(inputs)).to(dtype), labels, path.name, sequence)
