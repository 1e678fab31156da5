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
        with np.load(path) as archive:
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


def load_cifar_folder(path: Path) -> EvalData:
    """CIFAR-10 or CIFAR-100 test set in the original python-pickle layout: a folder holding
    ``test_batch`` (CIFAR-10) or ``test`` (CIFAR-100), or its parent."""
    candidates = [path / "test_batch", path / "test",
                  path / "cifar-10-batches-py" / "test_batch", path / "cifar-100-python" / "test"]
    found = next((c for c in candidates if c.is_file()), None)
    if found is None:
        raise DataError(f"{path} holds no CIFAR test pickle (test_batch or test): point at the "
                        "extracted cifar-10-batches-py or cifar-100-python folder")
    with open(found, "rb") as handle:
        batch = pickle.load(handle, encoding="bytes")  # the dataset's own format: plain arrays
    labels = batch.get(b"labels", batch.get(b"fine_labels"))
    if labels is None or b"data" not in batch:
        raise DataError(f"{found} is not a CIFAR batch (no data/labels)")
    images = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return _from_uint8_nhwc(images, np.asarray(labels), f"{path.name}/{found.name}")


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
