"""The proof for the Loihi target: the emulator and Lava's own fixed-point simulator, both
reading the same .net file, spike identically in every layer at every step, on hand-made
networks at the edges of every field and on an exported student on real digits; golden
trajectories of the emulator's neuron; the lowering's refusals and its report."""

from __future__ import annotations

import nir
import numpy as np
import pytest
import torch

from stars_deploy.data import load_digits_split
from stars_deploy.exporters.loihi_export import (STATE_LIMIT, THRESHOLD_MANT_MAX, WEIGHT_MAX, WEIGHT_MIN,
                                                 LoihiExportError, lower_nir)
from stars_deploy.exporters.netx_format import (NETX_FORMAT, InputStage, NetxFormatError, NetxLayer, NetxNetwork, NeuronConfig,
                                                read_network, write_network)
from stars_deploy.exporters.nir_export import student_to_nir
from stars_deploy.targets.lava_sim import load_lava
from stars_deploy.targets.loihi import LoihiEmulator, cuba_run, load_emulator, netx_dense_weights
from stars_deploy.targets.nir_reference import NIRReference
from stars_deploy.targets.record import TargetResult, spike_mismatches, summarize

DIGITS_MEAN, DIGITS_STD = 0.5, 0.25


def assert_identical(lava: TargetResult, emulator: TargetResult) -> None:
    per_layer = spike_mismatches(lava, emulator)
    assert per_layer == {name: 0 for name in emulator.spikes}, per_layer
    assert torch.equal(lava.logits_t, emulator.logits_t)
    assert lava.latency_steps == emulator.latency_steps and lava.synops == emulator.synops


# ---- golden trajectories of one neuron ------------------------------------------------------
def one_neuron(i_decay: int, v_decay: int, v_th_mant: int) -> NetxLayer:
    return NetxLayer("dense", (1,), NeuronConfig(i_decay, v_decay, v_th_mant))


def trajectory(layer, a_in, bias=0, steps=None):
    a_in = torch.tensor(a_in, dtype=torch.int64).view(-1, 1, 1)
    spikes, u = cuba_run(a_in, torch.tensor(bias), layer, steps or a_in.shape[0], (1, 1))
    return spikes.flatten().int().tolist(), u.flatten().tolist()


def test_current_decay_offset_wrap_and_strict_threshold():
    # iDecay 4096: u holds only this step's input (a_in << 6)
    spikes, u = trajectory(one_neuron(4096, 0, 10), [5, 5, 5])
    assert u == [320, 320, 320]
    # v integrates 320 per step without leak; threshold 10 << 6 = 640 is strict: 640 does not spike
    assert spikes == [0, 0, 1]
    # iDecay 0: u never decays (netx writes du = -1, the model adds 1 back), and wraps at 2^23
    _, u = trajectory(one_neuron(0, 0, THRESHOLD_MANT_MAX), [2**16, 2**16, 2**16])
    assert u == [2**22, 2**23, 2**22 + 2**23 - 2**24]
    # iDecay 2048 halves u, truncating toward zero for negative values too
    _, u = trajectory(one_neuron(2048, 0, THRESHOLD_MANT_MAX), [-3, 0, 0])
    assert u == [-192, -96, -48]


def test_voltage_decay_clip_and_reset_to_zero():
    # vDecay 4095 keeps |v| / 4096 (truncated); the bias enters v as bias << 6
    spikes, _ = trajectory(one_neuron(4096, 4095, 100), [0, 0, 0], bias=64)
    assert spikes == [0, 0, 0]  # v = 4096, 4097, 4097 < 6400
    # negative saturation at -(2^23 - 1): strongly negative input without leak
    layer = one_neuron(4096, 0, 1)
    a_in = torch.full((4, 1, 1), -2**16, dtype=torch.int64)
    spikes, u = cuba_run(a_in, torch.tensor(-4096), layer, 4, (1, 1))
    assert spikes.sum() == 0
    # reset: v above threshold spikes and restarts from 0 (not from v - threshold)
    spikes, _ = trajectory(one_neuron(4096, 0, 1), [1, 1, 1, 1])
    assert spikes == [0, 1, 0, 1]  # 64, 128 > 64 -> spike, 0 + 64, 128 -> spike


def test_netx_dense_weight_chain_keeps_even_8bit_weights_and_maps_all_negative_minus_256_to_minus_255():
    weights = np.array([[-256, 254, 2, -2], [0, 100, -50, 6]])
    effective, exponent = netx_dense_weights(weights)
    assert exponent == 0 and np.array_equal(effective, weights)
    odd = np.array([[3, -5, 7, 1]])
    effective, exponent = netx_dense_weights(odd)  # netx shifts by 5 bits, Lava shifts the sum back
    assert exponent == -5 and effective.tolist() == (odd << 5).tolist()
    effective, _ = netx_dense_weights(np.array([[-256, -2, 0]]))
    assert effective.tolist() == [[-255, -2, 0]]  # Lava clips inhibitory weights to 8 bits


# ---- hand-made networks at the edges, emulator against Lava ---------------------------------
def edge_dense_network(rng) -> NetxNetwork:
    def weights(shape, extra=()):
        w = 2 * rng.integers(WEIGHT_MIN // 2, WEIGHT_MAX // 2 + 1, size=shape)
        flat = w.reshape(-1)
        flat[:len(extra)] = extra
        return w
    w1 = weights((12, 16), (WEIGHT_MIN, WEIGHT_MAX, WEIGHT_MIN, WEIGHT_MAX))
    w1[1], w1[2] = WEIGHT_MAX, WEIGHT_MIN  # drive u of these neurons to the 24-bit edge
    w2 = rng.integers(-255, 255, size=(10, 12))  # odd weights: netx's 9-bit path
    w2[0, :2] = (WEIGHT_MIN, 253)
    w3 = -2 * rng.integers(0, 129, size=(8, 10))  # all-inhibitory, with -256 (Lava makes it -255)
    w3[0, 0] = WEIGHT_MIN
    layers = [
        NetxLayer("input", (16,), NeuronConfig(4096, 1, 1000)),
        NetxLayer("dense", (12,), NeuronConfig(0, 4095, THRESHOLD_MANT_MAX), w1,
                  rng.integers(-4096, 4096, size=12)),  # u never decays: it wraps
        NetxLayer("dense", (10,), NeuronConfig(4095, 0, 1), w2,
                  np.array([-4096, 4095] + [-300] * 8)),  # no leak: v saturates negative
        NetxLayer("dense", (8,), NeuronConfig(2048, 2048, 3000), w3, np.full(8, 4095)),
    ]
    meta = [{"spike_name": f"l{i}", "exponent": 0, "spiking": True} for i in range(4)]
    stage = InputStage("dense", np.eye(16), np.zeros(16), 1.0, 0.0, (16,))
    return NetxNetwork(layers, stage, {"format": NETX_FORMAT, "timesteps": 60, "readout": "spikes", "layers": meta})


def edge_conv_network(rng) -> NetxNetwork:
    conv = 2 * rng.integers(-128, 128, size=(4, 3, 3, 3))
    conv[0, 0, 0, :2] = (WEIGHT_MIN, WEIGHT_MAX)
    readout = 2 * rng.integers(-128, 128, size=(5, 36))
    layers = [
        NetxLayer("input", (3, 6, 6), NeuronConfig(4096, 2048, 700)),
        NetxLayer("conv", (4, 3, 3), NeuronConfig(4096, 1024, 2000), conv, np.array([-4096, 4095, 0, 100]),
                  stride=(2, 2), padding=(1, 1)),
        NetxLayer("dense", (5,), NeuronConfig(4096, 4095, THRESHOLD_MANT_MAX), readout,
                  np.array([-4096, 4095, 0, 7, -7]), flatten_before=True),
    ]
    meta = [{"spike_name": "in", "exponent": 0, "spiking": True},
            {"spike_name": "conv", "exponent": 0, "spiking": True},
            {"spike_name": None, "exponent": 3, "spiking": False}]
    stage = InputStage("conv", rng.standard_normal((3, 1, 3, 3)), rng.standard_normal(3), 900.0, 10.0,
                       (1, 6, 6), padding=(1, 1))
    return NetxNetwork(layers, stage, {"format": NETX_FORMAT, "timesteps": 12, "readout": "current", "layers": meta})


def test_edge_case_networks_spike_identically_in_lava_and_the_emulator(tmp_path):
    rng = np.random.default_rng(0)
    dense_inputs = torch.tensor([[4095, -4096, 9000, -9000, 3000, 64, 1, 0, 2000, 4000, 100, -100,
                                  4095, 4095, 2500, 1500]] * 2, dtype=torch.float64)
    dense_inputs[1] = torch.from_numpy(rng.integers(-4096, 4096, 16)).double()
    for name, network, inputs in (("dense", edge_dense_network(rng), dense_inputs),
                                  ("conv", edge_conv_network(rng), torch.randn(3, 1, 6, 6) * 3)):
        path = tmp_path / f"{name}.net"
        write_network(path, network)
        emulator = load_emulator(path).run(inputs)
        lava = load_lava(path).run(inputs)
        assert_identical(lava, emulator)
        assert sum(emulator.spike_counts().values()) > 0, "a silent network proves nothing"
    # the dense network really reached the edges: clipped inputs, u wrapped past 2^23 in layer 1
    network = read_network(tmp_path / "dense.net")
    emulator = LoihiEmulator(network)
    record = emulator.run(dense_inputs)
    assert record.input_clipped == 2
    synapse, bias = emulator.synapses[1]
    a_in = synapse(record.spikes["l0"].flatten(0, 1)).unflatten(0, record.spikes["l0"].shape[:2])
    _, u = cuba_run(a_in, bias, network.layers[1], a_in.shape[0], tuple(a_in.shape[1:]))
    assert u.max() > 2**22 and u.min() < -2**22 and (u.diff(dim=0).abs() > 2**23).any()


# ---- the exported student on real digits -----------------------------------------------------
@pytest.fixture(scope="module")
def digits_images():
    return (load_digits_split("test").images - DIGITS_MEAN) / DIGITS_STD


def export_student(student, path):
    graph = student_to_nir(student, normalization=([DIGITS_MEAN], [DIGITS_STD]))
    network, report = lower_nir(graph, source="student")
    write_network(path, network)
    return graph, report


def test_exported_student_spikes_identically_in_lava_and_the_emulator(random_student, digits_images, tmp_path):
    student = random_student("convnet", timesteps=6)
    export_student(student, tmp_path / "student.net")
    images = digits_images[:4]
    emulator = load_emulator(tmp_path / "student.net").run(images)
    lava = load_lava(tmp_path / "student.net").run(images)
    assert_identical(lava, emulator)
    assert all(count > 0 for count in emulator.spike_counts().values())
    assert emulator.pipeline_delay_steps == 3 and emulator.latency_steps == 6 + 3


def test_fixed_point_follows_the_float_student_within_a_stated_bound(random_student, digits_images, tmp_path):
    """The pipeline delay is undone (records hold each layer's T-step window), so fixed and
    float records compare step by step: quantisation flips few spikes and few decisions."""
    student = random_student("convnet", timesteps=6)
    graph, report = export_student(student, tmp_path / "student.net")
    images = digits_images[:200]
    fixed = load_emulator(tmp_path / "student.net").run(images)
    floating = NIRReference(graph).run(images)
    summary = summarize(fixed, reference=floating)
    total = sum(s.numel() for s in floating.spikes.values())
    assert summary["spike_mismatches"] <= 0.01 * total, summary["spike_mismatches_per_layer"]
    assert summary["agreement"] >= 0.97
    assert summary["pipeline_delay_steps"] == 3 and summary["latency_steps"] == 9
    assert summary["energy_per_sample"]["loihi1_j"] > 0 and summary["neuron_updates_per_sample"] > 0
    assert [row["layer"] for row in report] == ["layers.0.lif", "layers.1.lif", "layers.2.lif", "readout"]
    for row in report[1:]:
        assert row["weights_clipped"] == 0 and row["u_max"] < 2**23 and row["v_bound"] <= STATE_LIMIT


def test_emulator_runs_batches_like_single_samples_and_on_cuda_if_present(random_student, digits_images, tmp_path):
    export_student(random_student("convnet"), tmp_path / "s.net")
    network = read_network(tmp_path / "s.net")
    batch = LoihiEmulator(network).run(digits_images[:8])
    single = LoihiEmulator(network).run(digits_images[5:6])
    assert all(torch.equal(batch.spikes[k][:, 5:6], single.spikes[k]) for k in batch.spikes)
    if torch.cuda.is_available():
        cuda = LoihiEmulator(network, device="cuda").run(digits_images[:8]).cpu()
        assert spike_mismatches(cuda, batch) == {k: 0 for k in batch.spikes}


# ---- refusals --------------------------------------------------------------------------------
def test_lowering_refuses_what_netx_cannot_run_naming_the_node(random_student):
    with pytest.raises(LoihiExportError, match=r"node 'stem\.lif' feeds 2 nodes.*skip connection"):
        lower_nir(student_to_nir(random_student("resnet")))
    with pytest.raises(LoihiExportError, match=r"'layers\.0\.lif' is a CubaLIF.*tau_syn_steps=None"):
        lower_nir(student_to_nir(random_student("convnet", tau_syn_steps=2.0)))
    one = np.ones(4, np.float32)
    lif = dict(tau=np.full(4, 2e-3), r=one, v_leak=0 * one, v_threshold=one)
    nodes = {"input": nir.Input({"input": np.array([4])}), "fc": nir.Affine(weight=np.eye(4, dtype=np.float32), bias=0 * one),
             "lif": nir.LIF(v_reset=0 * one, **lif), "out": nir.Output({"output": np.array([4])})}
    edges = [("input", "fc"), ("fc", "lif"), ("lif", "out")]
    graph = nir.NIRGraph(nodes=nodes, edges=edges, metadata={"timesteps": 4})
    with pytest.raises(LoihiExportError, match="no metadata dt_s.*--dt-s"):
        lower_nir(graph)
    network, _ = lower_nir(graph, dt_s=1e-3)
    assert network.metadata["readout"] == "spikes" and network.layers[0].neuron.v_decay == 2048
    nodes["lif"] = nir.LIF(v_reset=one * 0.5, **lif)
    with pytest.raises(LoihiExportError, match="'lif' resets to 0.5.*v_reset = 0"):
        lower_nir(nir.NIRGraph(nodes=nodes, edges=edges, metadata={"timesteps": 4}), dt_s=1e-3)
    nodes["lif"] = nir.LIF(v_reset=0 * one, **lif)
    nodes["pool"] = nir.SumPool2d(kernel_size=np.array([2, 2]), stride=np.array([2, 2]), padding=np.array([0, 0]))
    pooled = [("input", "fc"), ("fc", "pool"), ("pool", "lif"), ("lif", "out")]
    with pytest.raises(LoihiExportError, match="'pool' is a SumPool2d.*strided convolution"):
        lower_nir(nir.NIRGraph(nodes=nodes, edges=pooled, metadata={}, type_check=False), dt_s=1e-3, timesteps=4)
    with pytest.raises(LoihiExportError, match="'fc' is on a cycle.*recurren"):
        lower_nir(nir.NIRGraph(nodes=nodes, edges=edges + [("lif", "fc")], metadata={}, type_check=False),
                  dt_s=1e-3, timesteps=4)


def test_synaptic_sums_use_float32_only_where_exact():
    from stars_deploy.targets.loihi import exact_float

    assert exact_float(np.full((4, 576), 254)) == torch.float32  # the students' conv layers
    assert exact_float(np.full((2, 70000), 254)) == torch.float64  # sums can pass 2^24
    assert exact_float(np.full((4, 576), 254), torch.device("cuda")) == torch.float64  # TF32 convolutions


def test_reading_a_netx_file_not_written_here_fails_naming_it(tmp_path):
    import h5py

    path = tmp_path / "slayer.net"
    with h5py.File(path, "w") as handle:
        handle.create_group("layer/0")
    with pytest.raises(NetxFormatError, match="slayer.net has no 'stars' group"):
        load_emulator(path)
    with pytest.raises(NetxFormatError, match="does not exist"):
        load_emulator(tmp_path / "missing.net")
