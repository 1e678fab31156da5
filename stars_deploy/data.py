"""Evaluation data (never used for distillation): digits, CIFAR pickles, .npz files.

Every loader returns :class:`EvalData`: float images in [0, 1], shape (N, C, H, W), and int64
labels. Normalisation is the teacher's job (teachers.Normalizer).
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import DataError

DIGITS_TEST_FRACTION = 0.25
DIGITS_SPLIT_SEED = 0
DIGITS_MAX_VALUE = 16.0  # scikit-learn's digits are 4-bit counts, 0..16


@dataclass(frozen=True)
class EvalData:
    images: torch.Tensor  # (N, C, H, W) float32 in [0, 1]
    labels: torch.Tensor  # (N,) int64
    name: str

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, samples: int | None) -> "EvalData":
        """The first ``samples`` items (all when None)."""
        if samples is None or samples >= len(self):
            return self
        return EvalData(self.images[:samples], self.labels[:samples], f"{self.name}[:{samples}]")


def load_digits_split(split: str = "test") -> EvalData:
    """scikit-learn's bundled 8x8 digits with a fixed stratified split (25 % test, seed 0)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = digits.images.astype(np.float32) / DIGITS_MAX_VALUE
    train_x, test_x, train_y, test_y = train_test_split(
        images, digits.target, test_size=DIGITS_TEST_FRACTION, stratify=digits.target,
        random_state=DIGITS_SPLIT_SEED)
    x, y = (train_x, train_y) if split == "train" else (test_x, test_y)
    return EvalData(torch.from_numpy(x).unsqueeze(1), torch.from_numpy(y).long(), f"digits-{split}")


def _from_uint8_nhwc(images: np.ndarray, labels: np.ndarray, name: str) -> EvalData:
    tensor = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0
    return EvalData(tensor.contiguous(), torch.from_numpy(np.asarray(labels)).long(), name)


def load_npz(path: Path) -> EvalData:
    """An .npz with ``images`` (N, H, W, C) uint8 and ``labels`` (N,) integers."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            if "images" not in archive or "labels" not in archive:
                raise DataError(f"{path} needs arrays 'images' and 'labels'; it has {', '.join(archive.files)}")
            images, labels = archive["images"], archive["labels"]
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read {path} as .npz ({exc})") from None
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.dtype != np.uint8:
        raise DataError(f"{path}: 'images' must be (N, H, W, C) uint8, got {images.shape} {images.dtype}")
    if len(images) != len(labels):
        raise DataError(f"{path}: {len(images)} images but {len(labels)} labels")
    return _from_uint8_nhwc(images, labels, path.name)


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles only what a CIFAR batch holds: dicts, lists, bytes, ints and numpy arrays of
    plain (non-object) dtypes. Any other global (os.system, builtins.eval, a class) is refused
    before it is looked up, so a crafted file cannot run code."""

    def find_class(self, module: str, name: str):
        allowed = _CIFAR_GLOBALS.get((module, name))
        if allowed is None:
            raise pickle.UnpicklingError(f"refusing global {module}.{name}")
        return allowed


def _reconstruct(cls, shape, dtype):
    if cls is not np.ndarray:
        raise pickle.UnpicklingError("refusing an array subclass")
    return np.ndarray.__new__(np.ndarray, shape, _dtype(dtype))


def _dtype(spec, align=False, copy=False):
    dtype = np.dtype(spec, align, copy)
    if dtype.hasobject:
        raise pickle.UnpicklingError("refusing an object array")
    return dtype


def _frombuffer(buffer, dtype, shape, order):
    """Protocol 5's array constructor (numpy.core.numeric._frombuffer), for plain dtypes only."""
    return np.frombuffer(buffer, dtype=_dtype(dtype)).reshape(shape, order=order)


def _latin1(text, encoding="latin1"):
    """Python 2 pickles store bytes as latin-1 text (protocol 2's _codecs.encode)."""
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise pickle.UnpicklingError(f"refusing _codecs.encode with {encoding!r}")
    return text.encode("latin1")


_CIFAR_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy.core.numeric", "_frombuffer"): _frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _frombuffer,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): _dtype,
    ("_codecs", "encode"): _latin1,
}
CIFAR_MAX_BYTES = 1 << 30  # a CIFAR test batch is 30 MB; refuse what cannot be one


def read_cifar_batch(path: Path) -> dict:
    """The dict of a CIFAR python batch file, read by :class:`_CifarUnpickler` (no code runs)."""
    if path.stat().st_size > CIFAR_MAX_BYTES:
        raise DataError(f"{path} is {path.stat().st_size:,} bytes, more than any CIFAR batch: "
                        "convert the data to an .npz (images N,H,W,C uint8 + labels)")
    try:
        with open(path, "rb") as handle:
            batch = _CifarUnpickler(handle, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError,
            KeyError, MemoryError, OverflowError) as exc:
        raise DataError(f"{path} is not a plain CIFAR batch ({exc}); it was not loaded. Convert the data "
                        "to an .npz (images N,H,W,C uint8 + labels)") from None
    if not isinstance(batch, dict):
        raise DataError(f"{path} is not a CIFAR batch (a {type(batch).__name__}, not a dict)")
    return {key.decode("latin1") if isinstance(key, bytes) else key: value for key, value in batch.items()}


def load_cifar_folder(path: Path) -> EvalData:
    """CIFAR-10 or CIFAR-100 test set in the original python-pickle layout: a folder holding
    ``test_batch`` (CIFAR-10) or ``test`` (CIFAR-100), or its parent. The pickle is read by a
    restricted unpickler that admits only numpy arrays, lists, bytes and numbers."""
    candidates = [path / "test_batch", path / "test",
                  path / "cifar-10-batches-py" / "test_batch", path / "cifar-100-python" / "test"]
    found = next((c for c in candidates if c.is_file()), None)
    if found is None:
        raise DataError(f"{path} holds no CIFAR test pickle (test_batch or test): point at the "
                        "extracted cifar-10-batches-py or cifar-100-python folder")
    batch = read_cifar_batch(found)
    labels = batch.get("labels", batch.get("fine_labels"))
    data = batch.get("data")
    if labels is None or data is None:
        raise DataError(f"{found} is not a CIFAR batch: it needs 'data' and 'labels' (or 'fine_labels')")
    data = np.asarray(data)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataError(f"{found}: 'data' must be (N, 3072) uint8, got {data.shape} {data.dtype}")
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{found}: labels must be a list of integers")
    if len(labels) != len(data):
        raise DataError(f"{found}: {len(data)} images but {len(labels)} labels")
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return _from_uint8_nhwc(images, labels, f"{path.name}/{found.name}")


def load_eval_data(source: str) -> EvalData:
    """``digits`` (held-out split), ``digits-train``, a .npz file or a CIFAR pickle folder."""
    if source in ("digits", "digits-test"):
        return load_digits_split("test")
    if source == "digits-train":
        return load_digits_split("train")
    path = Path(source)
    if not path.exists():
        raise DataError(f"evaluation data {source!r} not found: give 'digits', a .npz file or a CIFAR folder")
    return load_cifar_folder(path) if path.is_dir() else load_npz(path)


def check_fits(data: EvalData, input_shape: tuple[int, int, int], num_classes: int, who: str) -> None:
    """Raise DataError when the images or labels do not fit the network ``who``."""
    if tuple(data.images.shape[1:]) != tuple(input_shape):
        raise DataError(
            f"evaluation data {data.name} has images of shape {tuple(data.images.shape[1:])} (C, H, W) "
            f"but {who} takes {tuple(input_shape)}: pick data that matches the teacher")
    if len(data) and int(data.labels.max()) >= num_classes:
        raise DataError(f"evaluation data {data.name} has label {int(data.labels.max())} "
                        f"but {who} has {num_classes} classes")
