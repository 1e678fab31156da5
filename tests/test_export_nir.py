"""Student -> NIR: folding, shapes, metadata, one round-trip test per node type, determinism."""

from __future__ import annotations

import time

import nir
import numpy as np
import pytest
import torch

from stars_deploy.exporters.nir_export import student_to_nir
from stars_deploy.exporters.nir_format import NIR_FORMAT, decode_metadata, nir_bytes, read_nir, write_nir
from stars_deploy.students.folding import fold_conv_bn, fold_student

rng = np.random.default_rng(0)


def _f32(*shape):
    return rng.standard_normal(shape).astype(np.float32)


NODE_FACTORIES = {
    "Input": lambda: nir.Input(input_type={"input": np.array([3, 4, 4])}),
    "Output": lambda: nir.Output(output_type={"output": np.array([5])}),
    "Affine": lambda: nir.Affine(weight=_f32(5, 3), bias=_f32(5)),
    "Linear": lambda: nir.Linear(weight=_f32(5, 3)),
    "Scale": lambda: nir.Scale(scale=_f32(3)),
    "Conv2d": lambda: nir.Conv2d(input_shape=(4, 4), weight=_f32(2, 3, 3, 3), stride=2, padding=1,
                                 dilation=1, groups=1, bias=_f32(2)),
    "Flatten": lambda: nir.Flatten(input_type={"input": np.array([3, 4, 4])}, start_dim=0, end_dim=-1),
    "SumPool2d": lambda: nir.SumPool2d(kernel_size=np.array([2, 2]), stride=np.array([2, 2]), padding=np.array([0, 0])),
    "AvgPool2d": lambda: nir.AvgPool2d(kernel_size=np.array([2, 2]), stride=np.array([2, 2]), padding=np.array([0, 0])),
    "IF": lambda: nir.IF(r=_f32(3), v_threshold=_f32(3), v_reset=_f32(3)),
    "LI": lambda: nir.LI(tau=np.full(3, 2e-3), r=_f32(3), v_leak=_f32(3)),
    "LIF": lambda: nir.LIF(tau=np.full(3, 2e-3), r=_f32(3), v_leak=_f32(3), v_threshold=_f32(3), v_reset=_f32(3)),
    "CubaLIF": lambda: nir.CubaLIF(tau_mem=np.full(3, 2e-3), tau_syn=np.full(3, 3e-3), r=_f32(3), v_leak=_f32(3),
                                   v_threshold=_f32(3), v_reset=_f32(3), w_in=_f32(3)),
    "Threshold": lambda: nir.Threshold(threshold=_f32(3)),
}


@pytest.mark.parametrize("kind", sorted(NODE_FACTORIES))
def test_every_node_type_round_trips_through_write_and_read(kind, tmp_path):
    node = NODE_FACTORIES[kind]()
    graph = nir.NIRGraph(nodes={"node": node}, edges=[], metadata={"dt_s": 1e-3}, type_check=False)
    write_nir(tmp_path / "g.nir", graph)
    read = nir.read(tmp_path / "g.nir", type_check=False).nodes["node"]
    assert type(read) is type(node)
    for key, value in node.to_dict().items():
        if key in ("type", "metadata"):
            continue
        np.testing.assert_array_equal(np.asarray(read.to_dict()[key]), np.asarray(value), err_msg=f"{kind}.{key}")
        assert np.asarray(read.to_dict()[key]).dtype == np.asarray(value).dtype, f"{kind}.{key} dtype"


def test_folding_matches_conv_then_batchnorm_within_float_rounding(random_student):
    student = random_student("convnet")
    layer = student.layers[1]
    x = torch.randn(5, layer.conv.in_channels, 8, 8)
    weight, bias = fold_conv_bn(layer.conv, layer.bn)
    folded = torch.nn.functional.conv2d(x, weight, bias, layer.conv.stride, layer.conv.padding)
    torch.testing.assert_close(folded, layer.bn(layer.conv(x)), rtol=1e-5, atol=1e-5)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fold_student(student).modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in student.modules()), "the original is untouched"


@pytest.mark.parametrize("family,tau_syn_steps,neuron", [("convnet", None, nir.LIF), ("resnet", 3.0, nir.CubaLIF)])
def test_exported_graph_has_full_shapes_folded_weights_and_metadata(random_student, family, tau_syn_steps,
                                                                       neuron, tmp_path):
    student = random_student(family, tau_syn_steps)
    write_nir(tmp_path / "s.nir", student_to_nir(student, class_names=list("abcdefghij"),
                                                 normalization=([0.5], [0.25])))
    graph = read_nir(tmp_path / "s.nir")  # type-checked
    for name, node in graph.nodes.items():
        for types in (node.input_type, node.output_type):
            for shape in types.values():
                assert shape is not None and len(shape) in (1, 3), f"{name}: shape {shape} (no batch dim)"
    assert graph.nodes["input"].output_type["output"].tolist() == [1, 8, 8]
    assert graph.nodes["output"].input_type["input"].tolist() == [10]
    neurons = [n for n in graph.nodes.values() if isinstance(n, (nir.LIF, nir.CubaLIF))]
    assert neurons and all(isinstance(n, neuron) for n in neurons)
    tau_mem = neurons[0].tau if neuron is nir.LIF else neurons[0].tau_mem
    np.testing.assert_array_equal(np.unique(tau_mem), [student.config.lif.tau_mem_s])
    if neuron is nir.CubaLIF:
        np.testing.assert_array_equal(np.unique(neurons[0].tau_syn), [3.0 * student.config.lif.dt_s])
    stem = student.layers[0] if family == "convnet" else student.stem
    stem_name = "layers.0.conv" if family == "convnet" else "stem.conv"
    weight, bias = fold_conv_bn(stem.conv, stem.bn)
    np.testing.assert_array_equal(graph.nodes[stem_name].weight, weight.numpy())
    np.testing.assert_array_equal(graph.nodes[stem_name].bias, bias.numpy())
    metadata = decode_metadata(graph.metadata)
    assert metadata["format"] == NIR_FORMAT and metadata["dt_s"] == student.config.lif.dt_s
    assert metadata["timesteps"] == 6 and metadata["reset"] == "value" and metadata["encoding"] == "direct"
    assert metadata["class_names"] == list("abcdefghij")
    assert metadata["normalization"] == {"mean": [0.5], "std": [0.25]}
    assert set(metadata["spike_layers"].values()) == set(student(torch.zeros(1, 1, 8, 8)).spikes)


@pytest.mark.parametrize("family", ["convnet", "resnet"])
def test_flatten_counts_start_dim_from_the_end_so_torch_readers_keep_the_batch(random_student, family, tmp_path):
    """NIR shapes have no batch: Flatten(start_dim=-3) of (C, H, W) is the whole sample, and
    torch.nn.Flatten(start_dim, end_dim) taken as written (Norse's and snnTorch's from_nir,
    nirtorch's default map) flattens (B, C, H, W) to (B, C*H*W), where start_dim=0 flattened the
    batch as well."""
    student = random_student(family)
    write_nir(tmp_path / "s.nir", student_to_nir(student))
    graph = read_nir(tmp_path / "s.nir")
    flatten = graph.nodes["flatten"]
    shape = tuple(int(s) for s in flatten.input_type["input"])
    assert (int(flatten.start_dim), int(flatten.end_dim)) == (-len(shape), -1)
    assert flatten.output_type["output"].tolist() == [int(np.prod(shape))]
    batch = torch.zeros(5, *shape)
    assert torch.nn.Flatten(int(flatten.start_dim), int(flatten.end_dim))(batch).shape == (5, int(np.prod(shape)))


def test_the_same_student_exports_to_identical_bytes(random_student):
    student = random_student("resnet")
    first = nir_bytes(student_to_nir(student))
    time.sleep(1.1)  # an embedded timestamp (seconds) would differ now
    assert nir_bytes(student_to_nir(student)) == first


def test_unreadable_file_names_the_file(tmp_path):
    bad = tmp_path / "broken.nir"
    bad.write_bytes(b"not hdf5")
    with pytest.raises(Exception, match="broken.nir"):
        read_nir(bad)
