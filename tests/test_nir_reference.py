"""The proof: a Norse student and its exported, written and read-back NIR graph, run by the
reference executor, spike identically at every step in every layer; an independent consumer
(nirtorch + Norse cells) reads the same file and gives the same outputs; foreign files."""

from __future__ import annotations

import nir
import numpy as np
import pytest
import torch

from stars_deploy.data import load_digits_split
from stars_deploy.exporters.nir_export import student_to_nir
from stars_deploy.exporters.nir_format import NIRFormatError, decode_metadata, write_nir
from stars_deploy.students.folding import fold_student
from stars_deploy.targets.nir_reference import NIRReference, conventions, load_reference
from stars_deploy.targets.record import TargetResult, spike_mismatches, summarize

FAMILIES = [("convnet", None), ("resnet", None), ("convnet", 2.0), ("resnet", 3.0)]
LOGIT_TOLERANCE = 1e-5


def student_record(student, images, target="student") -> TargetResult:
    with torch.no_grad():
        out = student(images)
    return TargetResult(target, out.logits_t, out.spikes, {})


def export_and_load(student, path) -> NIRReference:
    write_nir(path, student_to_nir(student))
    return load_reference(path)


@pytest.fixture(scope="module")
def digits_images():
    data = load_digits_split("test")
    return (data.images[:96] - 0.5) / 0.25  # a normalised batch of real digits


@pytest.mark.parametrize("family,tau_syn_steps", FAMILIES)
@pytest.mark.parametrize("inputs", ["random", "digits"])
def test_student_and_its_nir_file_spike_identically(random_student, family, tau_syn_steps, inputs,
                                                     digits_images, tmp_path):
    student = random_student(family, tau_syn_steps)
    images = torch.randn(64, 1, 8, 8) * 1.5 if inputs == "random" else digits_images
    reference = export_and_load(student, tmp_path / "s.nir").run(images)
    shipped = student_record(fold_student(student), images)
    per_layer = spike_mismatches(reference, shipped)
    assert per_layer == {name: 0 for name in shipped.spikes}, per_layer
    assert sum(reference.spike_counts().values()) > 0, "a silent network proves nothing"
    assert (reference.logits_t - shipped.logits_t).abs().max() <= LOGIT_TOLERANCE
    # the training-form student (BatchNorm unfolded) differs only by float rounding
    unfolded = student_record(student, images, "student-unfolded")
    assert sum(spike_mismatches(reference, unfolded).values()) <= 1e-4 * sum(s.numel() for s in unfolded.spikes.values())
    torch.testing.assert_close(reference.logits, unfolded.logits, atol=1e-3, rtol=0)


def nirtorch_with_norse(path):
    """The independent consumer: nirtorch 2.6 builds the graph, Norse cells are the neurons.
    It needs two entries in its node map: Affine (nirtorch's default drops the bias) and the
    neurons (LIF -> LIFBoxCell, CubaLIF -> LIFCell with rates 1/tau and dt from the metadata).
    Flatten takes nirtorch's default, torch.nn.Flatten(start_dim, end_dim) as written: the
    exporter counts start_dim from the end (-3), so the batch dimension stays."""
    import nirtorch
    from norse.torch import LIFBoxCell, LIFBoxParameters, LIFCell, LIFParameters

    graph = nir.read(path)
    metadata = decode_metadata(graph.metadata)
    dt_s = metadata["dt_s"]

    def scalar(array):
        return torch.as_tensor(float(np.asarray(array).flat[0]))

    def rate(tau):
        return torch.as_tensor(1.0 / float(np.asarray(tau).flat[0]))

    def affine(node):
        module = torch.nn.Linear(node.weight.shape[1], node.weight.shape[0])
        module.weight.data, module.bias.data = torch.from_numpy(node.weight), torch.from_numpy(node.bias)
        return module

    def common(node):
        return dict(v_leak=scalar(node.v_leak), v_th=scalar(node.v_threshold), v_reset=scalar(node.v_reset),
                    method="heaviside")

    node_map = {
        nir.Affine: affine,
        nir.LIF: lambda node: LIFBoxCell(LIFBoxParameters(tau_mem_inv=rate(node.tau), **common(node)), dt=dt_s),
        nir.CubaLIF: lambda node: LIFCell(LIFParameters(tau_syn_inv=rate(node.tau_syn), tau_mem_inv=rate(node.tau_mem),
                                                        **common(node)), dt=dt_s),
    }
    return nirtorch.nir_to_torch(graph, node_map), metadata["timesteps"]


@pytest.mark.parametrize("family,tau_syn_steps", [("convnet", None), ("resnet", 3.0)])
def test_an_independent_consumer_reads_the_same_file_and_agrees(random_student, family, tau_syn_steps, tmp_path):
    student = random_student(family, tau_syn_steps)
    images = torch.randn(32, 1, 8, 8) * 1.5
    reference = export_and_load(student, tmp_path / "s.nir").run(images)
    module, steps = nirtorch_with_norse(tmp_path / "s.nir")
    outputs, state = [], None
    with torch.no_grad():
        for _ in range(steps):
            out, state = module(images) if state is None else module(images, state)
            outputs.append(out)
    torch.testing.assert_close(torch.stack(outputs), reference.logits_t, atol=LOGIT_TOLERANCE, rtol=0)


def single_lif_graph(metadata, tau=2e-3, r=1.0, cuba=False) -> nir.NIRGraph:
    one = np.ones(1, dtype=np.float32)
    neuron = (nir.CubaLIF(tau_mem=np.full(1, tau), tau_syn=np.full(1, tau), r=r * one, v_leak=0 * one,
                          v_threshold=one, v_reset=0 * one, w_in=one) if cuba else
              nir.LIF(tau=np.full(1, tau), r=r * one, v_leak=0 * one, v_threshold=one, v_reset=0 * one))
    return nir.NIRGraph(nodes={"input": nir.Input({"input": np.array([1])}), "lif": neuron,
                               "output": nir.Output({"output": np.array([1])})},
                        edges=[("input", "lif"), ("lif", "output")], metadata=metadata)


def test_lif_golden_trajectory():
    # tau = 2 dt: v_t = v_{t-1}/2 + x/2 with x = 1.5: v = 0.75, 1.125 -> spike, reset 0, 0.75, ...
    result = NIRReference(single_lif_graph({"dt_s": 1e-3})).run(torch.full((1, 1), 1.5), timesteps=6)
    assert result.spikes["lif"].flatten().tolist() == [0, 1, 0, 1, 0, 1]


def snntorch_style_graph() -> nir.NIRGraph:
    """Written the way snnTorch's export_to_nir writes Leaky neurons: dt = 1e-4 s,
    tau = dt / (1 - beta), r = tau / dt, v_leak = 0, so that Euler gives v = beta v + W x + b."""
    dt, beta, hidden = 1e-4, np.float32(0.8), 16
    generator = np.random.default_rng(1)
    tau = np.full(hidden, dt / (1 - beta), dtype=np.float64)
    w1 = generator.standard_normal((hidden, 64)).astype(np.float32) * 0.3
    w2 = generator.standard_normal((10, hidden)).astype(np.float32)
    z16, z10 = np.zeros(hidden, np.float32), np.zeros(10, np.float32)
    nodes = {"input": nir.Input({"input": np.array([64])}),
             "fc1": nir.Affine(weight=w1, bias=z16 + 0.1),
             "lif1": nir.LIF(tau=tau, r=(tau / dt).astype(np.float32), v_leak=z16, v_threshold=z16 + 1, v_reset=z16),
             "fc2": nir.Affine(weight=w2, bias=z10),
             "lif2": nir.LIF(tau=tau[:10], r=(tau[:10] / dt).astype(np.float32), v_leak=z10,
                             v_threshold=z10 + 1, v_reset=z10),
             "output": nir.Output({"output": np.array([10])})}
    edges = [("input", "fc1"), ("fc1", "lif1"), ("lif1", "fc2"), ("fc2", "lif2"), ("lif2", "output")]
    return nir.NIRGraph(nodes=nodes, edges=edges, metadata={}), (w1, w2, beta)


def test_a_graph_written_elsewhere_runs_with_its_dt(tmp_path):
    graph, (w1, w2, beta) = snntorch_style_graph()
    nir.write(tmp_path / "snntorch.nir", graph)
    images = torch.rand(8, 64)
    result = load_reference(tmp_path / "snntorch.nir", dt_s=1e-4, timesteps=5).run(images)
    # snnTorch's own recurrence, reset to zero: v = beta v + I, spike when v > 1
    v1, v2, spikes = torch.zeros(8, 16), torch.zeros(8, 10), []
    for _ in range(5):
        v1 = beta * v1 + images @ torch.from_numpy(w1).T + 0.1
        z1 = (v1 > 1).float()
        v1 = v1 * (1 - z1)
        v2 = beta * v2 + z1 @ torch.from_numpy(w2).T
        z2 = (v2 > 1).float()
        v2 = v2 * (1 - z2)
        spikes.append(z2)
    expected = torch.stack(spikes)
    assert expected.sum() > 0
    mismatched = (result.spikes["lif2"] != expected).float().mean()
    assert mismatched <= 0.02, "same dynamics up to float rounding of dt/tau * r = 1"


def test_foreign_file_without_dt_or_with_the_wrong_dt_fails_loudly(tmp_path):
    graph, _ = snntorch_style_graph()
    nir.write(tmp_path / "snntorch.nir", graph)
    with pytest.raises(NIRFormatError, match="lif1.*dt_s"):
        load_reference(tmp_path / "snntorch.nir", timesteps=5)
    with pytest.raises(NIRFormatError, match="lif1.*unstable"):
        load_reference(tmp_path / "snntorch.nir", dt_s=1e-3, timesteps=5)
    with pytest.raises(NIRFormatError, match="reset"):
        NIRReference(single_lif_graph({"dt_s": 1e-3, "reset": "subtract"}))
    assert "Euler" in conventions() and "v_reset" in conventions()


def test_unsupported_node_is_named():
    graph = nir.NIRGraph(nodes={"input": nir.Input({"input": np.array([1])}),
                                "wait": nir.Delay(delay=np.ones(1)),
                                "output": nir.Output({"output": np.array([1])})},
                         edges=[("input", "wait"), ("wait", "output")], metadata={"dt_s": 1e-3}, type_check=False)
    with pytest.raises(NIRFormatError, match="'wait' is a Delay"):
        NIRReference(graph)


def test_summary_counts_synops_and_latency(random_student, tmp_path):
    student = random_student("convnet")
    images = torch.randn(16, 1, 8, 8) * 1.5
    reference = export_and_load(student, tmp_path / "s.nir")
    result = reference.run(images)
    summary = summarize(result, torch.zeros(16, dtype=torch.long), student_record(fold_student(student), images))
    assert summary["spike_mismatches"] == 0 and summary["agreement"] == 1.0
    last = result.spikes["layers.2"]
    readout_fan_out = 10
    assert result.synops["layers.2"] == last.sum().item() * readout_fan_out
    # layer 0 feeds a 3x3 conv with 16 output channels: interior spikes reach 9 * 16 synapses
    assert result.synops["layers.0"] <= result.spikes["layers.0"].sum().item() * 9 * 16
    assert summary["latency_steps"] == 6 and summary["pipeline_delay_steps"] == 0
    assert 1 <= summary["stable_decision_step_mean"] <= 6


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_reference_runs_on_cuda(random_student, tmp_path):
    student = random_student("resnet")
    images = torch.randn(16, 1, 8, 8)
    write_nir(tmp_path / "s.nir", student_to_nir(student))
    cpu = load_reference(tmp_path / "s.nir").run(images)
    cuda = load_reference(tmp_path / "s.nir", device="cuda").run(images).cpu()
    torch.testing.assert_close(cuda.logits, cpu.logits, atol=1e-4, rtol=0)
