"""Evaluation data (never used for distillation): digits, CIFAR pickles, .npz files.

Every loader returns :class:`EvalData`: float images in [0, 1], shape (N, C, H, W), and int64
labels. Normalisation is the teacher's job (teachers.Normalizer).

Files are validated at load, before anything is computed: images (N, H, W, C) uint8 with
N >= 1 (a CIFAR batch: (N, 3072) uint8), labels a 1-D list or array of integers (not bools,
floats or text) in [0, MAX_LABEL), one per image, and at most MAX_IMAGE_BYTES of images, checked
from an .npz's array headers before its arrays are read. Nothing in them is ever executed: an
.npz is read with allow_pickle=False, a CIFAR pickle by a restricted unpickler.
"""

from __future__ import annotations

import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import ConfigError, DataError
from .units import binary_size

DIGITS_TEST_FRACTION = 0.25
DIGITS_SPLIT_SEED = 0
DIGITS_MAX_VALUE = 16.0  # scikit-learn's digits are 4-bit counts, 0..16
MAX_LABEL = 2**31  # labels are class indices; anything this large is a corrupt file, not a class
MAX_IMAGE_BYTES = 2**30  # uint8 images (4x this as the float32 tensor): 30x CIFAR's test set


@dataclass(frozen=True)
class EvalData:
    images: torch.Tensor  # (N, C, H, W) float32 in [0, 1]
    labels: torch.Tensor  # (N,) int64
    name: str

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, samples: int | None) -> "EvalData":
        """The first ``samples`` items (all when None)."""
        if samples is not None and samples < 1:
            raise ConfigError(f"--samples must be at least 1, got {samples}")
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
    return EvalData(tensor.contiguous(), torch.from_numpy(labels.astype(np.int64)), name)


def check_labels(labels, count: int, where: str) -> np.ndarray:
    """``labels`` as int64 after checking them: 1-D integers (a list of ints or an integer
    array), one per image, in [0, MAX_LABEL). ``where`` names the file in the error."""
    if isinstance(labels, list):
        # a list is checked item by item before numpy sees it: np.asarray would turn floats,
        # bools or text into an array that looks numeric, and nested lists into a 2-D one
        bad = next((item for item in labels if type(item) is not int), None)
        if bad is not None:
            raise DataError(f"{where}: labels must be integers (class indices), found {bad!r} "
                            f"({type(bad).__name__})")
        if labels and (min(labels) < 0 or max(labels) >= MAX_LABEL):
            value = min(labels) if min(labels) < 0 else max(labels)
            raise DataError(f"{where}: label {value} is not a class index (labels are 0, 1, ... classes - 1)")
        labels = np.array(labels, dtype=np.int64)
    if not isinstance(labels, np.ndarray) or labels.dtype.kind not in "iu" or labels.ndim != 1:
        what = (f"{labels.dtype} array of shape {labels.shape}" if isinstance(labels, np.ndarray)
                else type(labels).__name__)
        raise DataError(f"{where}: labels must be a 1-D array of integers (class indices), got a {what}; "
                        "save them as int64")
    if len(labels) != count:
        raise DataError(f"{where}: {count} images but {len(labels)} labels")
    if labels.size and (int(labels.min()) < 0 or int(labels.max()) >= MAX_LABEL):
        value = int(labels.min()) if int(labels.min()) < 0 else int(labels.max())
        raise DataError(f"{where}: label {value} is not a class index (labels are 0, 1, ... classes - 1)")
    return labels.astype(np.int64)


def _npz_header(archive, key: str) -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) of one array of an .npz from its .npy header; its data is not read."""
    with archive.zip.open(f"{key}.npy") as handle:
        version = np.lib.format.read_magic(handle)
        # format 3.0 differs from 2.0 only in the header's text encoding (UTF-8)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read(handle)
    return tuple(int(s) for s in shape), dtype


def load_npz(path: Path) -> EvalData:
    """An .npz with ``images`` (N, H, W, C) or (N, H, W) uint8 and ``labels`` (N,) integers,
    validated from the array headers before the arrays are read (module docstring)."""
    path = Path(path)
    try:
        archive = np.load(path, mmap_mode="r", allow_pickle=False)  # mmap: a .npy is not read to be refused
        if not isinstance(archive, np.lib.npyio.NpzFile):
            raise DataError(f"{path} is a single .npy array, not an .npz archive: save the data with "
                            "np.savez(path, images=..., labels=...)")
        with archive:
            if "images" not in archive or "labels" not in archive:
                raise DataError(f"{path} needs arrays 'images' and 'labels'; it has "
                                f"{', '.join(archive.files) or 'none'}")
            shape, dtype = _npz_header(archive, "images")
            if len(shape) not in (3, 4) or dtype != np.uint8:
                raise DataError(f"{path}: 'images' must be (N, H, W, C) uint8, got {shape} {dtype}: convert "
                                "them to 8-bit pixels")
            if int(np.prod(shape, dtype=np.float64)) * dtype.itemsize > MAX_IMAGE_BYTES:
                raise DataError(f"{path}: 'images' {shape} would take "
                                f"{binary_size(int(np.prod(shape, dtype=np.float64)))} (more than "
                                f"{binary_size(MAX_IMAGE_BYTES)}); evaluate on a subset")
            label_shape, label_dtype = _npz_header(archive, "labels")
            if len(label_shape) != 1 or label_dtype.kind not in "iu":
                raise DataError(f"{path}: labels must be a 1-D array of integers (class indices), got "
                                f"{label_shape} {label_dtype}; save them as int64")
            images, labels = archive["images"], archive["labels"]
    except DataError:
        raise
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, RuntimeError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if "pickled" in reason:  # numpy takes what is neither a zip nor a .npy for a pickle
            reason = "neither a zip archive nor a .npy array"
        raise DataError(f"cannot read {path} as .npz: the file is truncated, corrupt or not an .npz "
                        f"({reason})") from None
    if images.ndim == 3:
        images = images[..., None]
    if len(images) == 0 or 0 in images.shape:
        raise DataError(f"{path}: 'images' {images.shape} holds no images; give at least one")
    return _from_uint8_nhwc(images, check_labels(labels, len(images), str(path)), path.name)


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
    except Exception as exc:  # no code can run here, so any failure is a malformed file
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"{path} is not a plain CIFAR batch ({reason}); it was not loaded. Convert the data "
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
    # an array, not a list: np.asarray of nested lists that share references could expand a
    # small pickle into an enormous array
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        what = f"{data.shape} {data.dtype}" if isinstance(data, np.ndarray) else f"a {type(data).__name__}"
        raise DataError(f"{found}: 'data' must be an (N, 3072) uint8 array, got {what}")
    if len(data) == 0:
        raise DataError(f"{found}: 'data' holds no images; give at least one")
    labels = check_labels(labels, len(data), str(found))
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
    if path.is_dir():
        return load_cifar_folder(path)
    if not path.is_file():  # a FIFO or a device would block or never end
        raise DataError(f"evaluation data {source!r} is not a regular file: give a .npz file or a CIFAR folder")
    return load_npz(path)


def check_fits(data: EvalData, input_shape: tuple[int, int, int], num_classes: int, who: str) -> None:
    """Raise DataError when the images or labels do not fit the network ``who``."""
    if tuple(data.images.shape[1:]) != tuple(input_shape):
        raise DataError(
            f"evaluation data {data.name} has images of shape {tuple(data.images.shape[1:])} (C, H, W) "
            f"but {who} takes {tuple(input_shape)}: pick data that matches the teacher")
    if len(data) and int(data.labels.max()) >= num_classes:
        raise DataError(f"evaluation data {data.name} has label {int(data.labels.max())} "
                        f"but {who} has {num_classes} classes")
    if len(data) and int(data.labels.min()) < 0:
        raise DataError(f"evaluation data {data.name} has label {int(data.labels.min())}; labels are class "
                        "indices, 0 or more")
