"""Foreign NIR done right (issue 17.2, 17.4): the NIR paper's files from Sinabs and the braille
RNN; IF neurons and pools lowered to Loihi exactly; recurrence in the reference; the same
initial state in every target; warnings instead of silent wrong answers; explicit shapes."""

from __future__ import annotations

import json
import shutil

import nir
import numpy as np
import pytest
import torch

from stars_deploy.errors import DataError
from stars_deploy.exporters.loihi_export import LoihiExportError, lower_nir, netx_table, report_lines
from stars_deploy.exporters.nir_format import NIRFormatError, read_nir
from stars_deploy.targets.loihi import LoihiEmulator
from stars_deploy.targets.nir_reference import NIRReference, load_reference
from stars_deploy.targets.record import summarize





def events(steps: int, samples: int, rate: float = 0.05, seed: int = 0) -> np.ndarray:
    """(N, T, 2, 34, 34) random ON/OFF events, N-MNIST's shape (N-MNIST itself is not here)."""
    return (np.random.default_rng(seed).random((samples, steps, 2, 34, 34)) < rate).astype(np.float32)


# ---- Sinabs' N-MNIST CNN (IF neurons, SumPool2d) --------------------------------------------------
def test_cnn_sinabs_lowers_to_loihi_and_runs_spike_for_spike_in_lava(tmp_path, thirdparty, cli_main):
    nir_file = tmp_path / "cnn_sinabs.nir"
    shutil.copy(thirdparty("nir_paper/cnn_sinabs.nir"), nir_file)  # the export writes beside it
    code, out, err = cli_main("export", "--target", "loihi", nir_file, "--dt-s", 1, "-T", 8, "--quiet")
    assert code == 0, err
    assert "IF -> CUBA LIF with vDecay 0" in out and "SumPool2d 2x2 folded into '5' into a 6x6/2 convolution" in out
    assert "SumPool2d 2x2 folded into '9' into the dense weights (512 inputs)" in out
    record = json.loads((tmp_path / "export.json").read_text())
    assert [r["node"] for r in record["rewrites"]] == ["1", "3", "4", "6", "7", "10", "12"]
    np.savez(tmp_path / "events.npz", sequences=events(8, 2))
    code, out, err = cli_main("simulate", "--target", "loihi", tmp_path / "cnn_sinabs.net", "--inputs",
                              tmp_path / "events.npz", "--compare", "lava", "--json", "--quiet")
    assert code == 0, err
    lava = json.loads(out)
    assert lava["spike_mismatches"] == 0 and lava["max_logit_difference"] == 0
    assert all(count > 0 for count in lava["spikes_per_layer"].values())
    # against the float reference: as close as 8-bit weights allow, reported per layer
    code, out, err = cli_main("simulate", "--target", "loihi", tmp_path / "cnn_sinabs.net", "--inputs",
                              tmp_path / "events.npz", "--compare", "nir", "--dt-s", 1, "-T", 8, "--json", "--quiet")
    assert code == 0, err
    summary = json.loads(out)
    per_layer = summary["spike_mismatches_per_layer"]
    assert set(per_layer) == {"1", "3", "6", "10", "12"}
    first = summary["reference_firing_rate_per_layer"]["1"] * 2 * 8 * 16 * 16 * 16
    assert per_layer["1"] <= 0.05 * first  # the 13-bit input layer


def test_the_fold_of_a_pool_is_the_same_linear_map(thirdparty):
    graph = read_nir(thirdparty("nir_paper/cnn_sinabs.nir"))
    network, _ = lower_nir(graph, dt_s=1.0, timesteps=4)
    assert [layer.kind for layer in network.layers] == ["input", "conv", "conv", "dense", "dense"]
    assert network.layers[2].weight.shape[2:] == (6, 6) and network.layers[2].stride == (2, 2)
    assert network.layers[3].flatten_before and network.layers[3].weight.shape == (256, 512)
    assert all(layer.neuron.v_decay == 0 for layer in network.layers)  # IF: no leak


def test_a_dt_that_silences_every_neuron_is_a_warning_not_a_silent_zero(tmp_path, thirdparty, cli_main):
    path = thirdparty("nir_paper/cnn_sinabs.nir")
    np.savez(tmp_path / "events.npz", sequences=events(25, 3))
    code, out, err = cli_main("simulate", "--target", "nir", path, "--dt-s", 1e-4, "-T", 25,
                              "--inputs", tmp_path / "events.npz", "--json", "--quiet")
    assert code == 0
    summary = json.loads(out)
    assert summary["spikes_per_sample"] == 0
    assert any("T dt r = 0.0025" in w and "--dt-s 1" in w for w in summary["warnings"])
    assert any("no layer spiked in any of the 3 samples" in w for w in summary["warnings"])
    assert "stars-deploy: warning: no layer spiked" in err and "stars-deploy: warning: node '1' (IF)" in err
    code, out, _ = cli_main("simulate", "--target", "nir", path, "--dt-s", 1, "-T", 25,
                            "--inputs", tmp_path / "events.npz", "--json", "--quiet")
    assert code == 0 and json.loads(out)["warnings"] == [] and json.loads(out)["spikes_per_sample"] > 0


def test_implausible_time_constants_are_a_warning():
    one = np.ones(2, np.float32)
    graph = nir.NIRGraph(nodes={"input": nir.Input({"input": np.array([2])}),
                                "lif": nir.LIF(tau=np.full(2, 2.0), r=one, v_leak=0 * one, v_threshold=one,
                                               v_reset=0 * one),
                                "output": nir.Output({"output": np.array([2])})},
                         edges=[("input", "lif"), ("lif", "output")], metadata={})
    reference = NIRReference(graph, dt_s=1e-4, timesteps=5)
    assert any("20,000 steps" in w and "--dt-s" in w for w in reference.warnings)


# ---- the braille RNN: recurrence in the reference ---------------------------------------------------
def braille_by_hand(graph: nir.NIRGraph, inputs: np.ndarray, dt: float) -> tuple[np.ndarray, np.ndarray]:
    """The braille network as NIR defines it, by Euler at dt, written out on its own (float64):
    i += dt/tau_syn (w_in x - i), v += dt/tau_mem (v_leak - v + r i), spike v > 1, v = 0; the
    recurrent input of step t is W_rec z_{t-1} + b_rec."""
    n = graph.nodes
    fc1, rec, fc2, lif1, lif2 = n["fc1"], n["lif1.w_rec"], n["fc2"], n["lif1.lif"], n["lif2"]

    def cuba(node, x, state):
        i, v = state
        i = i + dt / node.tau_syn * (node.w_in * x - i)
        v = v + dt / node.tau_mem * (node.v_leak - v + node.r * i)
        z = (v - node.v_threshold > 0).astype(np.float64)
        return z, (i, (1 - z) * v + z * node.v_reset)

    batch = inputs.shape[1]
    s1, s2 = (np.zeros((batch, 38)), np.zeros((batch, 38))), (np.zeros((batch, 7)), np.zeros((batch, 7)))
    z1, out1, out2 = np.zeros((batch, 38)), [], []
    for x in inputs.astype(np.float64):
        drive = x @ fc1.weight.T + fc1.bias + z1 @ rec.weight.T + rec.bias
        z1, s1 = cuba(lif1, drive, s1)
        z2, s2 = cuba(lif2, z1 @ fc2.weight.T + fc2.bias, s2)
        out1.append(z1)
        out2.append(z2)
    return np.stack(out1), np.stack(out2)


def test_the_braille_rnn_runs_in_the_reference_with_the_recurrent_edge_one_step_late(tmp_path, thirdparty, cli_main):
    path = thirdparty("nir_paper/braille_noDelay_bias_zero.nir")
    reference = load_reference(path, dt_s=1e-4, timesteps=120)
    assert reference.delayed == {("lif1.w_rec", "lif1.lif")}
    assert reference.plan == [["input"], ["fc1"], ["lif1.lif", "lif1.w_rec"], ["fc2"], ["lif2"], ["output"]]
    inputs = (np.random.default_rng(0).random((120, 6, 12)) < 0.1).astype(np.float32)
    result = reference.run(torch.from_numpy(inputs))
    hidden, out = braille_by_hand(reference.graph, inputs, 1e-4)
    total = hidden.size + out.size  # measured: 0 of 32,400 differ (float32 against float64)
    assert hidden.sum() > 100 and out.sum() > 100, "a silent network proves nothing"
    mismatches = int((result.spikes["lif1.lif"].numpy() != hidden).sum() + (result.spikes["lif2"].numpy() != out).sum())
    assert mismatches == 0, f"{mismatches} of {total} spikes differ from NIR's equations written out"
    np.savez(tmp_path / "braille.npz", sequences=inputs.transpose(1, 0, 2), labels=np.arange(6) % 7)
    code, out_text, err = cli_main("simulate", "--target", "nir", path, "--dt-s", 1e-4, "-T", 120,
                                   "--inputs", tmp_path / "braille.npz", "--json", "--quiet")
    assert code == 0, err
    summary = json.loads(out_text)
    assert summary["samples"] == 6 and summary["accuracy"] is not None
    assert summary["spikes_per_layer"]["lif1.lif"] == pytest.approx(hidden.sum() / 6, rel=0.01)
    outputs = 7  # the braille network's classes
    np.savez(tmp_path / "wrong.npz", sequences=inputs.transpose(1, 0, 2), labels=np.full(6, outputs))
    code, _, err = cli_main("simulate", "--target", "nir", path, "--dt-s", 1e-4, "-T", 120,
                            "--inputs", tmp_path / "wrong.npz", "--quiet")
    assert code == 2 and f"wrong.npz: label {outputs}, but {path} has {outputs} outputs" in err
    assert len(err.strip().splitlines()) == 1


def test_a_cycle_without_a_neuron_is_refused_naming_only_its_nodes():
    one = np.ones(2, np.float32)
    eye = np.eye(2, dtype=np.float32)
    graph = nir.NIRGraph(nodes={"input": nir.Input({"input": np.array([2])}), "pre": nir.Affine(eye, 0 * one),
                                "a": nir.Affine(eye, 0 * one), "b": nir.Linear(eye),
                                "lif": nir.LIF(tau=np.full(2, 2e-3), r=one, v_leak=0 * one, v_threshold=one,
                                               v_reset=0 * one),
                                "output": nir.Output({"output": np.array([2])})},
                         edges=[("input", "pre"), ("pre", "a"), ("a", "b"), ("b", "a"), ("a", "lif"),
                                ("lif", "output")], metadata={"dt_s": 1e-3}, type_check=False)
    with pytest.raises(NIRFormatError, match=r"nodes a, b form a cycle without a neuron") as error:
        NIRReference(graph, timesteps=3)
    assert "pre" not in str(error.value) and "lif" not in str(error.value)


# ---- initial state, the same in every target ---------------------------------------------------------
def leaky_graph(v_leak: float, v_reset: float, tau: float = 4e-3) -> nir.NIRGraph:
    rng = np.random.default_rng(3)
    one = np.ones(6, np.float32)
    return nir.NIRGraph(nodes={
        "input": nir.Input({"input": np.array([5])}),
        "fc": nir.Affine(weight=rng.standard_normal((6, 5)).astype(np.float32), bias=0.3 * one),
        "lif": nir.LIF(tau=np.full(6, tau), r=one, v_leak=v_leak * one, v_threshold=one, v_reset=v_reset * one),
        "fc2": nir.Affine(weight=rng.standard_normal((3, 6)).astype(np.float32), bias=np.zeros(3, np.float32)),
        "output": nir.Output({"output": np.array([3])})},
        edges=[("input", "fc"), ("fc", "lif"), ("lif", "fc2"), ("fc2", "output")],
        metadata={"dt_s": 1e-3, "timesteps": 12})


def test_v_leak_starts_the_same_on_loihi_as_in_the_reference_or_is_refused_with_the_reason():
    graph = leaky_graph(v_leak=0.6, v_reset=0.6)  # v starts and resets at v_leak: w = v - v_leak starts at 0
    network, _ = lower_nir(graph)
    assert any("shifted by v_leak = 0.6" in r["rewrite"] for r in network.metadata["rewrites"])
    inputs = torch.rand(200, 5) * 2
    fixed = LoihiEmulator(network).run(inputs)
    floating = NIRReference(graph).run(inputs)
    summary = summarize(fixed, reference=floating)
    assert fixed.spikes["lif"].sum() > 100
    assert summary["spike_mismatches"] <= 0.01 * floating.spikes["lif"].numel()
    # the first spike comes at the same step: the state did start at v_leak on both sides
    assert torch.equal(fixed.spikes["lif"][:2], floating.spikes["lif"][:2])
    with pytest.raises(LoihiExportError, match=r"starts at v_leak = 0.6 and resets to 0.*Loihi starts v at 0"):
        lower_nir(leaky_graph(v_leak=0.6, v_reset=0.0))


def test_the_rounded_vdecay_is_in_the_quantisation_report():
    network, report = lower_nir(leaky_graph(0.0, 0.0, tau=0.1))  # 4096 dt/tau = 40.96
    assert network.layers[0].neuron.v_decay == 41 and report[0]["v_decay_exact"] == pytest.approx(40.96)
    payload = {"quantization": report, "netx_layers": netx_table(network), "rewrites": [],
               "pipeline_delay_steps": 1, "timesteps": 12}
    text = "\n".join(report_lines(payload))
    assert "vDecay of lif rounded: 41 for 4096 dt/tau = 40.96" in text and "40.96" in text.splitlines()[2]


def test_nan_weights_at_export_are_one_clean_error_naming_the_node(tmp_path, cli_main):
    graph = leaky_graph(0.0, 0.0)
    graph.nodes["fc2"].weight[1, 2] = np.nan
    nir.write(tmp_path / "nan.nir", graph)
    code, _, err = cli_main("export", "--target", "loihi", tmp_path / "nan.nir", "--quiet")
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert "node 'fc2' has 1 NaN or Inf weight value(s)" in err


def test_pools_that_do_not_tile_are_refused_and_avg_pools_fold():
    one = np.ones(4 * 4 * 4, np.float32)
    rng = np.random.default_rng(0)
    nodes = {"input": nir.Input({"input": np.array([1, 8, 8])}),
             "conv": nir.Conv2d(input_shape=(8, 8), weight=rng.standard_normal((4, 1, 3, 3)).astype(np.float32),
                                stride=1, padding=1, dilation=1, groups=1, bias=np.zeros(4, np.float32)),
             "pool": nir.AvgPool2d(kernel_size=np.array([2, 2]), stride=np.array([2, 2]), padding=np.array([0, 0])),
             "lif": nir.LIF(tau=np.full(64, 2e-3), r=one, v_leak=0 * one, v_threshold=one, v_reset=0 * one),
             "flat": nir.Flatten(input_type={"input": np.array([4, 4, 4])}, start_dim=0, end_dim=-1),
             "fc": nir.Affine(weight=rng.standard_normal((3, 64)).astype(np.float32), bias=np.zeros(3, np.float32)),
             "output": nir.Output({"output": np.array([3])})}
    edges = [("input", "conv"), ("conv", "pool"), ("pool", "lif"), ("lif", "flat"), ("flat", "fc"), ("fc", "output")]
    graph = nir.NIRGraph(nodes=nodes, edges=edges, metadata={"dt_s": 1e-3, "timesteps": 6}, type_check=False)
    network, _ = lower_nir(graph)
    assert network.input_stage.weight.shape == (4, 1, 4, 4) and network.input_stage.stride == (2, 2)
    assert "AvgPool2d 2x2 folded into 'conv' into a 4x4/2 convolution" in network.metadata["rewrites"][0]["rewrite"]
    images = torch.rand(50, 1, 8, 8)
    fixed, floating = LoihiEmulator(network).run(images), NIRReference(graph).run(images)
    assert summarize(fixed, reference=floating)["spike_mismatches"] <= 0.01 * floating.spikes["lif"].numel()
    nodes["pool"] = nir.AvgPool2d(kernel_size=np.array([3, 3]), stride=np.array([2, 2]), padding=np.array([0, 0]))
    with pytest.raises(LoihiExportError, match=r"'pool' is a AvgPool2d 3x3/2.*only non-overlapping pools"):
        lower_nir(nir.NIRGraph(nodes=nodes, edges=edges, metadata={"dt_s": 1e-3, "timesteps": 6}, type_check=False))


# ---- explicit shapes in the Python API (17.4) ---------------------------------------------------------
def test_a_batch_of_one_sequence_is_read_as_one_sample_of_t_steps(random_student):
    from stars_deploy.exporters.nir_export import student_to_nir

    reference = NIRReference(student_to_nir(random_student("convnet")))
    image = torch.randn(1, 1, 8, 8) * 1.5
    constant = reference.run(image)
    sequence = reference.run(image.expand(6, 1, 1, 8, 8).clone())  # (T, B = 1, C, H, W)
    assert sequence.samples == 1 and constant.samples == 1
    assert all(torch.equal(sequence.spikes[k], constant.spikes[k]) for k in constant.spikes)
    with pytest.raises(DataError, match=r"read both as 6 samples and as 6 steps of 1 sample.*sequence=True"):
        reference.run(torch.randn(6, 1, 64))
    assert reference.run(torch.randn(6, 1, 64), sequence=True).samples == 1
    assert reference.run(torch.randn(6, 1, 64), sequence=False).samples == 6
    with pytest.raises(NIRFormatError, match="the inputs have 5 steps, the run 6"):
        reference.run(torch.randn(5, 2, 1, 8, 8))
