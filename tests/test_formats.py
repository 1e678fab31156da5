"""Every file format we read is validated at load: one error naming the file and the node, key
or field, before anything is computed or allocated; our own files carry a sha256 that catches
bit flips. One test per family of checks (issue 15); tests/test_fuzz_files.py fuzzes them."""

from __future__ import annotations

import io
import pickle
import shutil
import time
import zipfile

import h5py
import numpy as np
import pytest
import torch

from stars_deploy.data import load_eval_data
from stars_deploy.distillation.pool import POOL_CHUNK_FORMAT, SyntheticPool, images_sha256
from stars_deploy.errors import CheckpointError, DataError
from stars_deploy.exporters.nir_export import student_to_nir
from stars_deploy.exporters.nir_format import NIRFormatError, decode_metadata, read_nir, write_nir
from stars_deploy.exporters import nir_validate
from stars_deploy.exporters.nir_validate import CHECKSUM_PATH, content_sha256, file_sha256
from stars_deploy.fileio import load_torch
from stars_deploy.students import StudentConfig, build_student, load_student, save_student
from stars_deploy.targets.nir_reference import load_reference


@pytest.fixture
def nir_file(tmp_path, random_student):
    path = tmp_path / "s.nir"
    write_nir(path, student_to_nir(random_student("convnet")))
    return path


def edit_nir(path, edit, rehash=True):
    """Apply ``edit(h5py.File)`` in place; with ``rehash`` store the checksum of the edited
    arrays, as a hostile or foreign writer could: then only validation can refuse the file."""
    with h5py.File(path, "r+") as handle:
        edit(handle)
        if rehash and CHECKSUM_PATH in handle:
            values = {}
            handle.visititems(lambda name, item: values.__setitem__(name, item[()])
                              if isinstance(item, h5py.Dataset) else None)
            del handle[CHECKSUM_PATH]
            handle[CHECKSUM_PATH] = content_sha256(values)  # the documented hash, over whatever is there
    return path


def replace(path_in_file, value, **options):
    def edit(handle):
        del handle[path_in_file]
        handle.create_dataset(path_in_file, data=value, **options)
    return edit


def set_element(path_in_file, index, value):
    def edit(handle):
        array = handle[path_in_file][()]
        array[index] = value
        handle[path_in_file][...] = array
    return edit


# ---- .nir ------------------------------------------------------------------------------------

def test_our_nir_files_carry_the_checksum_of_their_arrays(nir_file):
    graph = read_nir(nir_file)
    with h5py.File(nir_file, "r") as handle:
        assert decode_metadata(graph.metadata)["sha256"] == file_sha256(handle)


def test_a_bit_flip_in_a_weight_is_a_checksum_mismatch(nir_file):
    def flip(handle):
        weight = handle["node/nodes/layers.1.conv/weight"]
        array = weight[()]
        array.view(np.uint32).flat[7] ^= 1 << 4  # a mantissa bit: still a finite, plausible weight
        weight[...] = array
    edit_nir(nir_file, flip, rehash=False)
    with pytest.raises(NIRFormatError, match=r"s.nir: checksum mismatch.*modified or corrupted.*export it again"):
        read_nir(nir_file)


def test_a_renamed_checksum_key_is_refused_not_skipped(nir_file):
    edit_nir(nir_file, lambda h: h.move(CHECKSUM_PATH, "node/metadata/sha2R6"), rehash=False)
    with pytest.raises(NIRFormatError, match="metadata 'sha2R6' is not a key stars-deploy/nir-v1 files have"):
        read_nir(nir_file)


def test_a_ten_to_the_nine_neuron_layer_is_refused_before_allocating(nir_file):
    def huge(handle):
        lif = handle["node/nodes/layers.0.lif"]
        for name in ("r", "tau", "v_leak", "v_reset", "v_threshold"):
            del lif[name]  # chunked and never written: HDF5 keeps only the fill value on disk
            lif.create_dataset(name, shape=(10**9,), dtype="f4", chunks=(2**20,), compression="gzip", fillvalue=1.0)
    edit_nir(nir_file, huge, rehash=False)
    assert nir_file.stat().st_size < 600_000
    start = time.perf_counter()
    with pytest.raises(NIRFormatError, match=r"node 'layers.0.lif' \(LIF\) declares 1,000,000,000 neurons.*"
                                             r"at most 16,777,216\. Refused before allocating"):
        read_nir(nir_file)
    assert time.perf_counter() - start < 5  # nir.read alone allocated for 20 s before a MemoryError


@pytest.mark.parametrize("edit, match", [
    (set_element("node/nodes/layers.1.conv/weight", (0, 0, 0, 0), np.nan),
     r"node 'layers.1.conv' has 1 NaN or Inf weight value\(s\) of [0-9,]+ \(Conv2d field 'weight'\)"),
    (set_element("node/nodes/readout/bias", 3, np.inf), r"node 'readout' has 1 NaN or Inf bias value\(s\)"),
    (set_element("node/nodes/layers.0.lif/tau", (0, 0, 0), 0.0), r"'layers.0.lif' \(LIF\) field 'tau' has time "
                                                                  r"constants down to 0 s"),
    (replace("node/nodes/layers.0.conv/stride", np.array([0, 1])), r"field 'stride' is \[0, 1\]; it must be integers >= 1"),
    (replace("node/nodes/layers.0.conv/padding", np.array([1.5, 1.0])), r"field 'padding' must be at most 8 integers"),
    (replace("node/nodes/readout/weight", "oops"), r"node 'readout' \(Affine\) field 'weight' is object data"),
    (replace("node/nodes/readout/weight", np.zeros((10, 2), np.complex64)), r"node 'readout' field 'weight' has "
                                                                             r"dtype complex64"),
    (replace("node/nodes/input/shape", np.array([1, 0, 8])), r"node 'input' \(Input\) field 'shape' is \[1, 0, 8\]"),
    (replace("node/nodes/input/shape", np.array([1, 100000, 100000])), r"declares \[1, 100000, 100000\], more than"),
    (replace("node/nodes/layers.0.lif/type", "Transformer"), r"node 'layers.0.lif' has type 'Transformer', which "
                                                              r"NIR 1.0.8 does not define"),
    (lambda h: h.__delitem__("node/nodes/layers.0.lif/tau"), r"node 'layers.0.lif' \(LIF\) lacks tau"),
    (set_element("node/edges", (0, 1), b"nowhere"), r"edge \['input', 'nowhere'\] names node 'nowhere'"),
    (replace("node/metadata/dt_s", "0.001"), r"metadata dt_s = '0.001'; it must be a finite number of seconds > 0"),
    (replace("node/metadata/dt_s", -1e-3), r"metadata dt_s = -0.001"),
    (replace("node/metadata/dt_s", np.nan), r"metadata dt_s = nan"),
    (replace("node/metadata/timesteps", 0), r"metadata timesteps = 0; it must be an integer in \[1, 10000\]"),
    (replace("node/metadata/timesteps", 10**7), r"metadata timesteps = 10000000"),
    (replace("node/metadata/timesteps", 2.5), r"metadata timesteps = 2.5"),
    (replace("node/metadata/normalization", "{mean: 0.5"), r"metadata 'normalization' is not valid JSON"),
    (replace("node/metadata/normalization", '{"mean": [0.5], "std": [0.0]}'), r"normalization must be .* std > 0"),
    (replace("node/metadata/normalization", '{"mean": [NaN], "std": [1.0]}'), r"normalization must be .* finite"),
    (replace("node/metadata/normalization", '{"mean": [0, 0], "std": [1, 1]}'), r"normalization has 2 channels but "
                                                                                r"the input has 1"),
    (replace("node/metadata/class_names", '["a", "b"]'), r"class_names has 2 names but the output has 10 values"),
    (replace("node/metadata/spike_layers", '{"layers.9.lif": "x"}'), r"spike_layers names node 'layers.9.lif'"),
    (replace("node/metadata/readout", "last"), r"metadata readout = 'last'; stars-deploy's readers support 'mean'"),
], ids=lambda value: value if isinstance(value, str) else "")
def test_each_bad_field_is_refused_with_its_node_and_key(nir_file, edit, match):
    # rehashed: the checksum is right, so the field's own check must refuse it
    edit_nir(nir_file, edit)
    with pytest.raises(NIRFormatError, match=match):
        read_nir(nir_file)


def test_a_file_from_another_tool_is_validated_without_a_checksum(nir_file):
    def foreign(handle):
        for key in ("sha256", "format", "spike_layers"):
            del handle[f"node/metadata/{key}"]
    edit_nir(nir_file, foreign, rehash=False)
    reference = load_reference(nir_file)  # read and runs: no checksum to verify
    assert reference.run(torch.rand(2, 1, 8, 8)).logits.shape[-1] == 10
    edit_nir(nir_file, set_element("node/nodes/readout/weight", (2, 2), np.nan), rehash=False)
    with pytest.raises(NIRFormatError, match=r"node 'readout' has 1 NaN or Inf weight value\(s\)"):
        load_reference(nir_file)


def test_a_file_that_makes_the_hdf5_library_loop_is_refused_at_the_deadline(nir_file, monkeypatch):
    # zero the header of the second object of the global heap (where HDF5 keeps variable-length
    # strings): a free-space object of size 0, which libhdf5 1.14 parses without ever advancing
    data = bytearray(nir_file.read_bytes())
    heap = data.index(b"GCOL")
    first = heap + 16  # after 'GCOL', version, 3 reserved bytes and the 8-byte collection size
    size = int.from_bytes(data[first + 8:first + 16], "little")
    second = first + 16 + (size + 7) // 8 * 8
    data[second:second + 32] = bytes(32)
    nir_file.write_bytes(bytes(data))
    monkeypatch.setattr(nir_validate, "READ_TIMEOUT_S", 1.0)
    start = time.perf_counter()
    with pytest.raises(NIRFormatError, match=r"s.nir as a NIR graph: the HDF5 library did not finish reading it in 1 s"):
        read_nir(nir_file)
    assert time.perf_counter() - start < 10


def test_a_directory_or_a_non_hdf5_file_is_named_for_what_it_is(tmp_path):
    with pytest.raises(NIRFormatError, match="is a directory: give the .nir file inside it"):
        read_nir(tmp_path)
    (tmp_path / "x.nir").write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(100))
    with pytest.raises(NIRFormatError, match=r"cannot read .*x.nir as a NIR graph: not an HDF5 file, or truncated"):
        read_nir(tmp_path / "x.nir")


# ---- npz and CIFAR -----------------------------------------------------------------------------

IMAGES = np.zeros((3, 8, 8, 1), np.uint8)


@pytest.mark.parametrize("arrays, match", [
    ({"labels": np.array(["a", "b", "c"])}, r"labels must be a 1-D array of integers .* got \(3,\) <U1"),
    ({"labels": np.zeros((3, 2), np.int64)}, r"labels must be a 1-D array of integers .* got \(3, 2\) int64"),
    ({"labels": np.array([0, -1, 2])}, r"label -1 is not a class index"),
    ({"labels": np.array([0.0, 2.7, 1.0])}, r"got \(3,\) float64; save them as int64"),
    ({"labels": np.array([True, False, True])}, r"got \(3,\) bool"),
    ({"images": np.zeros((0, 8, 8, 1), np.uint8), "labels": np.zeros(0, np.int64)}, r"holds no images"),
    ({"images": IMAGES.astype(np.float32)}, r"'images' must be \(N, H, W, C\) uint8, got \(3, 8, 8, 1\) float32"),
    ({"labels": np.arange(4)}, r"3 images but 4 labels"),
])
def test_bad_npz_arrays_are_refused_with_the_file_named(tmp_path, arrays, match):
    np.savez(tmp_path / "d.npz", **{"images": IMAGES, "labels": np.arange(3), **arrays})
    with pytest.raises(DataError, match=f"d.npz.*{match}"):
        load_eval_data(str(tmp_path / "d.npz"))


def npz_declaring(path, shapes):
    """An .npz whose members are .npy headers only: {name: (shape, dtype)}, no data behind them."""
    with zipfile.ZipFile(path, "w") as archive:
        for name, (shape, dtype) in shapes.items():
            buffer = io.BytesIO()
            np.lib.format.write_array_header_1_0(buffer, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                                                          "fortran_order": False, "shape": shape})
            archive.writestr(f"{name}.npy", buffer.getvalue())
    return path


def test_an_npz_declaring_gigabytes_is_refused_from_its_header(tmp_path):
    npz_declaring(tmp_path / "bomb.npz", {"images": ((40000, 200, 200, 3), np.uint8), "labels": ((40000,), np.int64)})
    with pytest.raises(DataError, match=r"'images' \(40000, 200, 200, 3\) would take 4.5 GiB \(more than 1.0 GiB\)"):
        load_eval_data(str(tmp_path / "bomb.npz"))
    np.save(tmp_path / "array.npy", IMAGES)
    with pytest.raises(DataError, match=r"array.npy is a single .npy array, not an .npz archive"):
        load_eval_data(str(tmp_path / "array.npy"))


@pytest.mark.parametrize("labels, match", [
    ([0, 1.5], r"labels must be integers \(class indices\), found 1.5 \(float\)"),
    (["a", "b"], r"labels must be integers \(class indices\), found 'a' \(str\)"),
    ([[0], [1]], r"labels must be integers \(class indices\), found \[0\] \(list\)"),
    ([True, False], r"labels must be integers \(class indices\), found True \(bool\)"),
    ([0, -1], r"label -1 is not a class index"),
    (np.zeros((2, 1), np.int64), r"labels must be a 1-D array of integers"),
])
def test_bad_cifar_labels_are_refused(tmp_path, labels, match):
    with open(tmp_path / "test_batch", "wb") as handle:
        pickle.dump({b"data": np.zeros((2, 3072), np.uint8), b"labels": labels}, handle)
    with pytest.raises(DataError, match=f"test_batch: {match}"):
        load_eval_data(str(tmp_path))


def test_an_empty_cifar_batch_is_refused(tmp_path):
    with open(tmp_path / "test_batch", "wb") as handle:
        pickle.dump({b"data": np.zeros((0, 3072), np.uint8), b"labels": []}, handle)
    with pytest.raises(DataError, match="'data' holds no images"):
        load_eval_data(str(tmp_path))


# ---- student.pt ------------------------------------------------------------------------------

@pytest.fixture
def student_file(tmp_path, random_student):
    save_student(tmp_path / "student.pt", random_student("convnet"))
    return tmp_path / "student.pt"


def resave(path, change):
    payload = torch.load(path, weights_only=True)
    change(payload)
    torch.save(payload, path)
    return path


def _set(keys, value):
    def change(payload):
        target = payload
        for key in keys[:-1]:
            target = target[key]
        target[keys[-1]] = value
        payload.pop("sha256")  # so that the field's own check has to refuse it
    return change


def _drop(*keys):
    def change(payload):
        target = payload
        for key in keys[:-1]:
            target = target[key]
        del target[keys[-1]]
        payload.pop("sha256", None)
    return change


@pytest.mark.parametrize("change, match", [
    (_set(("format",), "stars-deploy/student-v0"), r"is not a stars-deploy student"),
    (_drop("state_dict"), r"lacks state_dict"),
    (_drop("config", "lif"), r"config must have the keys .*; it has \['depth', 'family'"),
    (_set(("config", "width"), "8"), r"config.width must be an integer >= 1, got '8'"),
    (_set(("config", "timesteps"), 10**9), r"config.timesteps = 1000000000, more than 10000"),
    (_set(("config", "timesteps"), 4.0), r"config.timesteps must be an integer >= 1, got 4.0"),
    (_set(("config", "input_shape"), [1, 8]), r"config.input_shape must be 3 integers >= 1"),
    (_set(("config", "lif", "tau_mem_steps"), float("nan")), r"config.lif.tau_mem_steps must be a finite number"),
    (_set(("config", "family"), "transformer"), r"config does not describe a student: unknown student 'transformer'"),
    (_set(("config", "width"), 100000), r"does not fit SpikingConvNet: .*mis-shaped keys: layers.0.conv.weight \(8, 1, 3, 3\) != \(100000, 1, 3, 3\)"),
    (_set(("state_dict", "readout.bias"), torch.tensor([float("nan")] * 10)), r"readout.bias holds 10 NaN"),
    (_set(("state_dict", "readout.bias"), torch.zeros(10, dtype=torch.float64)), r"readout.bias is a torch.strided "
                                                                                 r"torch.float64 tensor"),
    (_set(("state_dict", "layers.0.bn.running_var"), -torch.ones(8)), r"running_var has negative BatchNorm variances"),
    (_set(("shape",), 3), r"has key 'shape', which student files do not have"),
], ids=lambda value: value if isinstance(value, str) else "")
def test_each_bad_student_field_is_refused_with_the_file_and_key(student_file, change, match):
    with pytest.raises(CheckpointError, match=match):
        load_student(resave(student_file, change))


def test_a_bit_flip_in_a_student_weight_is_a_checksum_mismatch(student_file):
    def flip(payload):
        payload["state_dict"]["layers.1.conv.weight"].view(torch.int32).view(-1)[5] ^= 1 << 3
    with pytest.raises(CheckpointError, match=r"student checkpoint .*student.pt: checksum mismatch"):
        load_student(resave(student_file, flip))


def test_a_student_saved_before_checksums_still_loads(student_file):
    model = load_student(student_file)
    legacy = resave(student_file, lambda payload: payload.pop("sha256"))
    images = torch.rand(3, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(load_student(legacy)(images).logits, model(images).logits)


def test_an_absurd_width_allocates_nothing_before_it_is_refused(tmp_path):
    # config says width 10^6 (a 10^12-weight network); the file holds a width-4 student's weights
    save_student(tmp_path / "s.pt", build_student(StudentConfig(width=4)))
    resave(tmp_path / "s.pt", _set(("config", "width"), 10**6))
    start = time.perf_counter()
    with pytest.raises(CheckpointError, match="does not fit"):
        load_student(tmp_path / "s.pt")
    assert time.perf_counter() - start < 5


# ---- torch files (fileio) -----------------------------------------------------------------------

def test_random_bytes_never_get_torchs_advice_to_disable_weights_only(tmp_path):
    (tmp_path / "random.pt").write_bytes(np.random.default_rng(0).bytes(5000))
    with pytest.raises(CheckpointError) as caught:
        load_torch(tmp_path / "random.pt")
    message = str(caught.value)
    assert "random.pt: the file is truncated, corrupt or not a PyTorch checkpoint" in message
    assert "weights_only" not in message and "\n" not in message


def test_a_pickled_global_is_named_and_not_run(tmp_path):
    torch.save({"f": shutil.rmtree}, tmp_path / "code.pt")
    with pytest.raises(CheckpointError, match=r"refusing to load checkpoint .*code.pt: .*\(global shutil.rmtree\), "
                                              r"and it was not run") as caught:
        load_torch(tmp_path / "code.pt")
    assert "weights_only" not in str(caught.value)


def test_a_directory_is_not_said_not_to_exist(tmp_path):
    with pytest.raises(CheckpointError, match=r"student checkpoint .* is a directory, not a file"):
        load_student(tmp_path)


# ---- pool chunks ----------------------------------------------------------------------------------

def make_pool(folder, values=(0.0, 1.0, 2.0)):
    pool = SyntheticPool(folder, memory_limit_mb=100)
    for value in values:
        pool.add(torch.full((4, 1, 8, 8), value))
    pool.flush()
    return pool


def test_pool_chunks_carry_their_checksum_in_the_file_and_the_checkpoint(tmp_path):
    pool = make_pool(tmp_path)
    payload = torch.load(tmp_path / "chunk_000001.pt", weights_only=True)
    assert payload["format"] == POOL_CHUNK_FORMAT and payload["sha256"] == images_sha256(torch.full((4, 1, 8, 8), 1.0))
    assert pool.state()[1] == {"size": 4, "sha256": payload["sha256"]}


def test_a_bit_flip_in_a_pool_chunk_is_refused_at_restore(tmp_path):
    pool = make_pool(tmp_path)
    payload = torch.load(tmp_path / "chunk_000001.pt", weights_only=True)
    payload["images"].view(torch.int32).view(-1)[9] ^= 1
    torch.save(payload, tmp_path / "chunk_000001.pt")
    with pytest.raises(CheckpointError, match=r"pool chunk .*chunk_000001.pt: checksum mismatch: .*the file says"):
        SyntheticPool(tmp_path).restore(pool.state())


def test_swapped_pool_chunks_are_refused_by_the_checkpoints_hashes(tmp_path):
    pool = make_pool(tmp_path)
    first, second = tmp_path / "chunk_000000.pt", tmp_path / "chunk_000001.pt"
    data = first.read_bytes()
    first.write_bytes(second.read_bytes())
    second.write_bytes(data)
    with pytest.raises(CheckpointError, match=r"chunk_00000[01].pt: checksum mismatch: .*the checkpoint says"):
        SyntheticPool(tmp_path).restore(pool.state())


@pytest.mark.parametrize("images, match", [
    (torch.full((4, 1, 8, 8), float("nan")), "holds NaN or infinite pixels"),
    (torch.zeros(5, 1, 8, 8), "holds 5 images, the checkpoint says 4"),
    (torch.zeros(4, 1, 8, 7), r"holds images of shape \(1, 8, 7\), the other chunks \(1, 8, 8\)"),
    (torch.zeros(4, 64, dtype=torch.int64), r"holds a torch.int64 tensor of shape \(4, 64\)"),
])
def test_a_bad_pool_chunk_is_refused_naming_it(tmp_path, images, match):
    # written consistently (its own sha256 right, the checkpoint's list without hashes): the
    # content checks must refuse it
    make_pool(tmp_path)
    torch.save({"format": POOL_CHUNK_FORMAT, "images": images, "sha256": images_sha256(images)},
               tmp_path / "chunk_000000.pt")
    with pytest.raises(CheckpointError, match=f"pool chunk .*chunk_000000.pt {match}"):
        SyntheticPool(tmp_path).restore([4, 4, 4])


def test_a_pool_checkpointed_before_checksums_restores(tmp_path):
    for index, value in enumerate((0.0, 1.0)):
        torch.save(torch.full((4, 1, 8, 8), value), tmp_path / f"chunk_{index:06d}.pt")  # bare tensors, as before
    pool = SyntheticPool(tmp_path)
    pool.restore([4, 4])
    assert len(pool) == 8 and sorted(pool.sample(200)[:, 0, 0, 0].unique().tolist()) == [0.0, 1.0]


@pytest.mark.parametrize("state", [{"sizes": [4]}, [4, "4"], [{"size": 4, "sha256": "0" * 63}], [0]])
def test_a_malformed_pool_list_in_a_checkpoint_is_refused(tmp_path, state):
    make_pool(tmp_path)
    with pytest.raises(CheckpointError, match="the checkpoint's pool"):
        SyntheticPool(tmp_path).restore(state)
