import pickle

import numpy as np
import pytest
import torch

from stars_deploy.data import check_fits, load_digits_split, load_eval_data
from stars_deploy.errors import DataError


def test_digits_split_is_fixed_stratified_and_disjoint():
    test, train = load_digits_split("test"), load_digits_split("train")
    assert len(test) == 450 and len(train) == 1347
    assert test.images.shape[1:] == (1, 8, 8) and 0 <= float(test.images.min()) and float(test.images.max()) <= 1
    counts = torch.bincount(test.labels, minlength=10)
    assert int(counts.min()) >= 43 and int(counts.max()) <= 47  # 25 % of 174..183 per class
    assert torch.equal(load_digits_split("test").images, test.images)
    flat_train = {tuple(x.flatten().tolist()) for x in train.images}
    overlap = sum(tuple(x.flatten().tolist()) in flat_train for x in test.images)
    assert overlap < 5  # the raw digits hold a handful of exact duplicate images


def test_npz_round_trip(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    np.savez(tmp_path / "d.npz", images=images, labels=np.arange(5))
    data = load_eval_data(str(tmp_path / "d.npz"))
    assert data.images.shape == (5, 3, 32, 32)
    assert float(data.images[1, 2, 3, 4]) == pytest.approx(images[1, 3, 4, 2] / 255)
    assert data.labels.tolist() == [0, 1, 2, 3, 4]


def test_cifar_pickle_folder(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    raw = np.random.default_rng(1).integers(0, 256, (4, 3072), dtype=np.uint8)
    with open(folder / "test_batch", "wb") as handle:
        pickle.dump({b"data": raw, b"labels": [3, 1, 4, 1]}, handle)
    data = load_eval_data(str(tmp_path))
    assert data.images.shape == (4, 3, 32, 32) and data.labels.tolist() == [3, 1, 4, 1]
    assert float(data.images[2, 1, 0, 5]) == pytest.approx(raw[2, 1024 + 5] / 255)


def test_bad_data_is_named(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_eval_data(str(tmp_path / "none.npz"))
    np.savez(tmp_path / "bad.npz", pixels=np.zeros(3))
    with pytest.raises(DataError, match="bad.npz needs arrays 'images' and 'labels'"):
        load_eval_data(str(tmp_path / "bad.npz"))
    with pytest.raises(DataError, match="holds no CIFAR test pickle"):
        load_eval_data(str(tmp_path))
    with pytest.raises(DataError, match=r"shape \(1, 8, 8\).*takes \(3, 32, 32\)"):
        check_fits(load_digits_split("test"), (3, 32, 32), 10, "teacher cifar_resnet20")


class _RunsCode:
    """Unpickling this would call os.system: the classic pickle exploit."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_a_cifar_pickle_that_would_run_code_is_refused_and_runs_nothing(tmp_path, protocol):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    marker = tmp_path / "pwned"
    raw = np.zeros((2, 3072), dtype=np.uint8)
    with open(folder / "test_batch", "wb") as handle:
        pickle.dump({b"data": raw, b"labels": [0, 1], b"batch_label": _RunsCode(marker)}, handle, protocol=protocol)
    with pytest.raises(DataError, match=r"test_batch is not a plain CIFAR batch \(refusing global posix.system\)"):
        load_eval_data(str(tmp_path))
    assert not marker.exists()


def test_cifar_pickle_of_other_objects_is_refused(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    for name, payload in (("object array", {b"data": np.array([object()] * 2), b"fine_labels": [0, 1]}),
                          ("a set", {b"data": {1, 2}, b"fine_labels": [0, 1]})):
        with open(folder / "test", "wb") as handle:
            pickle.dump(payload, handle, protocol=2)
        with pytest.raises(DataError, match="not a plain CIFAR batch|'data' must be"):
            load_eval_data(str(tmp_path))


def test_cifar100_and_python2_style_pickles_load(tmp_path):
    """Protocol 2 with latin-1 bytes (as the original Python 2 files) and CIFAR-100's keys."""
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    raw = np.random.default_rng(2).integers(0, 256, (3, 3072), dtype=np.uint8)
    with open(folder / "test", "wb") as handle:
        pickle.dump({b"data": raw, b"fine_labels": [7, 99, 0], b"coarse_labels": [1, 2, 3],
                     b"batch_label": b"testing batch 1 of 1", b"filenames": [b"a.png", b"b.png", b"c.png"]},
                    handle, protocol=2)
    data = load_eval_data(str(tmp_path))
    assert data.labels.tolist() == [7, 99, 0]
    assert float(data.images[1, 2, 31, 31]) == pytest.approx(raw[1, 3071] / 255)


def test_cifar_batch_with_wrong_contents_is_named(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for payload, message in (({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, r"\(N, 3072\) uint8"),
                             ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}, "2 images but 1 labels"),
                             ({b"data": np.zeros((2, 3072), np.uint8)}, "needs 'data' and 'labels'"),
                             ([1, 2, 3], "a list, not a dict")):
        with open(folder / "test_batch", "wb") as handle:
            pickle.dump(payload, handle)
        with pytest.raises(DataError, match=message):
            load_eval_data(str(tmp_path))
    (folder / "test_batch").write_bytes(b"\x80\x04garbage")
    with pytest.raises(DataError, match="not a plain CIFAR batch"):
        load_eval_data(str(tmp_path))
