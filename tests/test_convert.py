"""``stars-deploy convert``: a converted teacher lowered to NIR (exporters/converted_nir.py), read
back with nir.read and run by the NIR reference spike for spike with the torch network, and the
command's run directory as simulate and export see it. Teachers: the digits teacher, and CIFAR-style
ResNets built here with random BatchNorm statistics (the CIFAR files stay out of tests)."""

import json

import nir
import pytest
import torch
from torch import nn

from stars_deploy.conversion import ConvertedNetwork
from stars_deploy.errors import ConfigError
from stars_deploy.exporters.converted_nir import converted_to_nir
from stars_deploy.exporters.nir_format import decode_metadata, write_nir
from stars_deploy.targets.nir_reference import load_reference
from stars_deploy.teachers import CifarResNet

CIFAR_LIKE = (3, 16, 16)
EXPORTED_KINDS = {nir.Input, nir.Output, nir.Conv2d, nir.I, nir.Threshold, nir.Scale, nir.AvgPool2d, nir.Flatten,
                  nir.Affine}


def lowered(teacher, shape, timesteps, tmp_path, calibration=None):
    network = ConvertedNetwork(teacher)
    network.calibrate(calibration if calibration is not None else torch.randn(128, *shape))
    path = tmp_path / "converted.nir"
    with torch.no_grad():
        classes = [str(i) for i in range(network(torch.zeros(1, *shape)).shape[1])]
    write_nir(path, converted_to_nir(network, shape, timesteps, 1e-3, classes,
                                     ([0.0] * shape[0], [1.0] * shape[0])))
    return network, path


def torch_spikes(network, images, timesteps):
    """(logits, {site name: (T, B, ...) spikes}) of the torch network."""
    steps = {name: [] for name, _ in network.graph.named_children() if name.startswith("if_site")}
    hooks = [site.register_forward_hook(lambda m, a, out, name=name: steps[name].append((out > 0).float()))
             for name, site in network.graph.named_children() if name in steps]
    try:
        logits, _ = network.simulate(images, timesteps)
    finally:
        for hook in hooks:
            hook.remove()
    return logits, {name: torch.stack(values) for name, values in steps.items()}


@pytest.mark.parametrize("depth", [8, 14])
def test_a_converted_resnet_runs_in_the_nir_reference_spike_for_spike(depth, tmp_path, randomize_bn):
    teacher = randomize_bn(CifarResNet(depth=depth))  # option-A shortcuts, residual additions, mean pooling
    images = torch.randn(48, *CIFAR_LIKE)
    network, path = lowered(teacher, CIFAR_LIKE, 12, tmp_path)
    logits, expected = torch_spikes(network, images, 12)
    result = load_reference(path).run(images)
    assert set(result.spikes) == set(expected) and len(expected) == 3 * (depth - 2) // 6 * 2 + 1
    for name, spikes in expected.items():
        assert torch.equal(result.spikes[name], spikes), name
    assert sum(float(s.sum()) for s in expected.values()) > 0
    assert torch.allclose(result.logits_t.mean(0), logits, atol=1e-5)


def test_the_converted_graph_is_plain_nir_with_a_reset_loop_per_site(tmp_path, randomize_bn):
    network, path = lowered(randomize_bn(CifarResNet(depth=8)), CIFAR_LIKE, 8, tmp_path)
    graph = nir.read(path)
    assert {type(node) for node in graph.nodes.values()} <= EXPORTED_KINDS
    for index, site in enumerate(network.sites):
        name = f"if_site_{index}"
        assert (f"{name}.reset", f"{name}.integrator") in graph.edges
        assert float(graph.nodes[name].scale.flat[0]) == pytest.approx(float(site.threshold))
        assert float(graph.nodes[f"{name}.reset"].scale.flat[0]) == pytest.approx(-float(site.threshold))
        assert float(graph.nodes[f"{name}.spike"].threshold.flat[0]) == pytest.approx(float(site.threshold) / 2)
    shortcuts = [node for name, node in graph.nodes.items() if name.endswith(".embedding")]
    assert len(shortcuts) == 2  # the two stage changes: 16 -> 32 and 32 -> 64 channels, stride 2
    for node in shortcuts:
        weight = node.weight[:, :, 0, 0]
        assert list(node.stride) == [2, 2] and set(weight.flatten().tolist()) == {0.0, 1.0}
        assert (weight.sum(1) <= 1).all() and (weight.sum(0) == 1).all()  # every input channel kept once


def test_synaptic_operations_count_the_synapses_and_not_the_reset_loop(tmp_path):
    teacher = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 4 * 4, 3)).eval()
    images = torch.rand(8, 1, 4, 4)
    _, path = lowered(teacher, (1, 4, 4), 10, tmp_path, calibration=torch.rand(64, 1, 4, 4))
    result = load_reference(path).run(images)
    spikes = float(result.spikes["if_site_0"].sum())
    assert spikes > 0 and result.synops["if_site_0"] == spikes * 3  # each spike reaches the 3 outputs


def test_what_nir_cannot_hold_is_refused_naming_the_node(tmp_path):
    pooled = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                           nn.Linear(8, 3)).eval()
    network = ConvertedNetwork(pooled)
    network.calibrate(torch.rand(16, 1, 4, 4))
    with pytest.raises(ConfigError, match=r"node 2 \(MaxPool2d: max over spikes"):
        converted_to_nir(network, (1, 4, 4), 4, 1e-3, ["a", "b", "c"], ([0.0], [1.0]))
    zero = ConvertedNetwork(nn.Sequential(nn.Flatten(), nn.Linear(16, 3), nn.ReLU()).eval(), reset="zero")
    zero.calibrate(torch.rand(16, 1, 4, 4))
    with pytest.raises(ConfigError, match="resets to zero"):
        converted_to_nir(zero, (1, 4, 4), 4, 1e-3, ["a", "b", "c"], ([0.0], [1.0]))


def test_convert_writes_a_run_that_simulate_export_and_check_take(cli_main, tmp_path, digits_teacher):
    code, out, err = cli_main("convert", "--calibration-images", 128, "--timesteps", 16, "--data", "digits",
                              "--runs-dir", tmp_path, "--name", "conv", "--json")
    assert code == 0, err
    summary = json.loads(out)
    run = tmp_path / "conv"
    assert summary["run_dir"] == str(run) and summary["sites"] == 3 and summary["calibration"]["images"] == 128
    nir_file = run / "export" / "student.nir"
    assert (run / "convert.json").is_file() and nir_file.is_file()
    teacher_accuracy = digits_teacher[1]["test_accuracy"]
    assert summary["accuracy"] >= teacher_accuracy - 0.05  # 16 steps of the digits teacher's three ReLUs
    code, out, err = cli_main("simulate", "--runs-dir", tmp_path, "--target", "nir", "--json")  # the latest run
    assert code == 0, err
    simulated = json.loads(out)
    assert simulated["run_dir"] == str(run) and simulated["compare"] == "none"
    assert simulated["accuracy"] == summary["accuracy"] and simulated["samples"] == summary["samples"]
    assert simulated["synops_per_sample"] > 0
    written = nir_file.read_bytes()
    code, out, err = cli_main("export", run, "--target", "nir", "--json")  # rebuilt from convert.json
    assert code == 0, err
    assert nir_file.read_bytes() == written and json.loads(out)["timesteps"] == 16
    code, out, err = cli_main("check", run, "--min-accuracy", summary["accuracy"] - 0.01, "--json")
    assert code == 0, err
    checked = json.loads(out)
    assert checked["target"] == "nir" and checked["reused"] and checked["passed"]
    code, out, _ = cli_main("check", run, "--min-agreement", 0.5, "--json")  # nothing to agree with
    assert code == 1 and "agreement was not measured" in json.loads(out)["gates"][0]["note"]
    for args in (("export", run, "--target", "loihi"), ("simulate", run, "--compare", "student")):
        code, out, err = cli_main(*args)
        assert code == 2 and "converted teacher" in err and len(err.strip().splitlines()) == 1, err


def test_a_converted_run_whose_teacher_changed_is_not_exported_again(cli_main, tmp_path, digits_teacher):
    code, _, err = cli_main("convert", "--calibration-images", 64, "-T", 4, "--runs-dir", tmp_path, "--name", "c")
    assert code == 0, err
    record = json.loads((tmp_path / "c" / "convert.json").read_text())
    record["teacher_sha256"] = "0" * 64
    (tmp_path / "c" / "convert.json").write_text(json.dumps(record))
    code, _, err = cli_main("export", tmp_path / "c", "--target", "nir")
    assert code == 2 and "sha256 differs" in err and len(err.strip().splitlines()) == 1


def test_convert_refuses_a_calibration_run_without_a_pool_in_one_line(cli_main, tmp_path, digits_teacher):
    (tmp_path / "empty").mkdir()
    code, _, err = cli_main("convert", "--calibrate-on", tmp_path / "empty", "--runs-dir", tmp_path / "runs")
    assert code == 2 and "no pool chunks" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists()  # refused before a run directory was made
    code, _, err = cli_main("convert", "--data", tmp_path / "missing.npz", "--runs-dir", tmp_path / "runs")
    assert code == 2 and "missing.npz" in err and "synthesising" not in err  # before any synthesis
    assert len([line for line in err.splitlines() if line.startswith("stars-deploy: error")]) == 1


def test_the_python_api_converts_a_module_teacher_and_checks_its_options(tmp_path, randomize_bn):
    import stars_deploy as sd

    teacher = randomize_bn(nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                                         nn.Flatten(), nn.Linear(4 * 8 * 8, 10)))
    summary = sd.convert(teacher, input_shape=(1, 8, 8), timesteps=4, calibration_images=16, runs_dir=tmp_path,
                         name="module")
    assert summary["sites"] == 1 and summary["teacher"]["arch"] == "module"
    graph = nir.read(tmp_path / "module" / "export" / "student.nir")
    assert decode_metadata(graph.metadata)["timesteps"] == 4
    with pytest.raises(ConfigError, match="unknown option 'budget_s'"):
        sd.convert(teacher, input_shape=(1, 8, 8), budget_s=10, runs_dir=tmp_path)


def test_convert_refuses_the_pool_of_another_teachers_run(cli_main, tmp_path, digits_teacher):
    from stars_deploy.fileio import save_torch, write_json
    from stars_deploy.runs import RUN_FORMAT

    other = tmp_path / "other"
    save_torch(other / "pool" / "chunk_000000.pt", {"images": torch.zeros(4, 1, 8, 8)})
    write_json(other / "manifest.json", {"format": RUN_FORMAT, "config": {}, "teacher_sha256": "0" * 64})
    code, _, err = cli_main("convert", "--calibrate-on", other, "--runs-dir", tmp_path / "runs")
    assert code == 2 and "another teacher checkpoint" in err and len(err.strip().splitlines()) == 1


class _Reshaping(nn.Module):
    """conv-BN-ReLU, average pooling and the usual reshapes of hand-written classifiers."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.pool = nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.AvgPool2d(2)
        self.hidden, self.head = nn.Linear(16, 8), nn.Linear(8, 3)

    def forward(self, x):
        x = self.pool(torch.relu(self.bn(self.conv(x))))
        x = x.view(x.size(0), -1)
        x = nn.functional.relu(self.hidden(x.reshape(x.shape[0], -1)))
        return self.head(x)


def test_reshapes_by_the_batch_size_and_pooling_lower_spike_for_spike(tmp_path, randomize_bn):
    teacher = randomize_bn(_Reshaping())
    images = torch.rand(16, 1, 4, 4)
    network, path = lowered(teacher, (1, 4, 4), 10, tmp_path, calibration=torch.rand(64, 1, 4, 4))
    logits, expected = torch_spikes(network, images, 10)
    result = load_reference(path).run(images)
    assert len(expected) == 2 and all(torch.equal(result.spikes[n], s) for n, s in expected.items())
    assert torch.allclose(result.logits_t.mean(0), logits, atol=1e-5)
