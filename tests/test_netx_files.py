"""Any netx file (issue 17.3, issue 15's .net part): lava-dl's own files run in the emulator and
in Lava spike for spike; every Loihi field is range-checked at load by both targets; our own
files carry a checksum; what we do not emulate is refused by name."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from stars_deploy.data import load_digits_split
from stars_deploy.exporters.netx_format import (CHECKSUM_KEY, InputStage, NetxFormatError, NetxLayer, NetxNetwork,
                                                NeuronConfig, content_sha256, read_network, write_network)
from stars_deploy.targets.lava_sim import load_lava
from stars_deploy.targets.loihi import load_emulator
from stars_deploy.targets.record import spike_mismatches

MNIST_NET = "lava_dl/trained_mnist_network.net"
TINY_NET = "lava_dl/tiny.net"




def digits_as_mnist(steps: int, samples: int | None = None, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, T, 784) rate-coded spikes of the held-out 8x8 digits drawn as MNIST digits are (a
    20x20 digit centred in 28x28, intensity = spike probability per step), and the labels."""
    data = load_digits_split("test").subset(samples)
    images = F.pad(F.interpolate(data.images, size=(20, 20), mode="bilinear", align_corners=False).clamp(0, 1),
                   (4, 4, 4, 4))
    generator = torch.Generator().manual_seed(seed)
    spikes = torch.rand((len(images), steps, 28 * 28), generator=generator) < images.flatten(1)[:, None]
    return spikes.to(torch.int64), data.labels


# ---- lava-dl's own files -------------------------------------------------------------------------
def test_lava_dls_mnist_network_runs_bit_exactly_in_the_emulator_and_lava(tmp_path, thirdparty, cli_main):
    """CUBA dense 784-128-64-10, no input layer: the inputs are spike trains into the first synapse."""
    path = thirdparty(MNIST_NET)
    spikes, labels = digits_as_mnist(12, samples=3)
    np.savez(tmp_path / "spikes.npz", sequences=spikes.numpy(), labels=labels.numpy())
    code, out, err = cli_main("simulate", "--target", "loihi", path, "--inputs", tmp_path / "spikes.npz",
                              "-T", 12, "--compare", "lava", "--json", "--quiet")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["reference"] == "lava" and summary["spike_mismatches"] == 0
    assert summary["spike_mismatches_per_layer"] == {"layer0": 0, "layer1": 0, "layer2": 0}
    assert summary["max_logit_difference"] == 0 and summary["agreement"] == 1.0
    assert all(count > 0 for count in summary["spikes_per_layer"].values()), "a silent network proves nothing"
    assert summary["pipeline_delay_steps"] == 3 and summary["latency_steps"] == 15  # the input synapse delays too
    # batched, the emulator classifies the held-out digits drawn as MNIST digits (chance: 10 %)
    spikes, labels = digits_as_mnist(16)
    result = load_emulator(path, timesteps=16).run(spikes.transpose(0, 1), sequence=True)
    assert float((result.predictions == labels).float().mean()) > 0.5


def test_lava_dls_loihi_type_conv_network_runs_bit_exactly(tmp_path, thirdparty, cli_main):
    """LOIHI neurons, an input layer and two strided convs: graded a_in inputs, constant and per step."""
    path = thirdparty(TINY_NET)
    generator = torch.Generator().manual_seed(0)
    constant = torch.randint(-100, 400, (2, 3, 16, 16), generator=generator)
    emulator = load_emulator(path)
    assert emulator.timesteps == 64  # the file's simulation/tSample
    assert any("netx ignores its weight and bias" in note for note in emulator.warnings)
    for inputs in (constant, torch.randint(-300, 900, (10, 2, 3, 16, 16), generator=generator)):
        steps = 10
        fixed = emulator.run(inputs, timesteps=steps)
        lava = load_lava(path, timesteps=steps).run(inputs)
        assert spike_mismatches(lava, fixed) == {"layer0": 0, "layer1": 0, "layer2": 0}
        assert torch.equal(lava.logits_t, fixed.logits_t)
        assert all(count > 0 for count in fixed.spike_counts().values())
    np.savez(tmp_path / "a_in.npz", inputs=constant.numpy())
    code, out, err = cli_main("simulate", "--target", "loihi", path, "--inputs", tmp_path / "a_in.npz",
                              "-T", 8, "--json", "--quiet")
    assert code == 0 and json.loads(out)["accuracy"] is None
    assert "stars-deploy: warning: layer 0 (input): netx ignores" in err  # also under --quiet


def test_a_foreign_file_without_inputs_says_how_to_feed_it(thirdparty, cli_main):
    path = thirdparty(MNIST_NET)
    code, out, err = cli_main("simulate", "--target", "loihi", path, "-T", 4, "--quiet")
    assert code == 2 and "Traceback" not in err and err.count("\n") == 1
    assert "netx file from another tool" in err and "--inputs FILE.npz" in err and "[784]" in err


def test_inputs_of_the_wrong_kind_are_refused_naming_the_rule(tmp_path, thirdparty):
    path = thirdparty(MNIST_NET)
    emulator = load_emulator(path, timesteps=4)
    with pytest.raises(NetxFormatError, match=r"spikes into the first synapse \(0 or 1\)"):
        emulator.run(torch.full((2, 784), 3))
    with pytest.raises(NetxFormatError, match="integers"):
        emulator.run(torch.full((2, 784), 0.5))
    with pytest.raises(Exception, match=r"takes \[784\] per sample"):
        emulator.run(torch.zeros(2, 783, dtype=torch.int64))
    with pytest.raises(NetxFormatError, match="3 steps, the run 4"):
        emulator.run(torch.zeros(3, 2, 784, dtype=torch.int64))


# ---- a small foreign file, written field by field, broken one field at a time --------------------
def neuron(**overrides) -> dict:
    fields = {"type": np.bytes_(b"CUBA"), "iDecay": np.int64(1024), "vDecay": np.int64(512),
              "vThMant": np.int64(200), "refDelay": np.int64(1), "gradedSpike": np.bool_(False)}
    fields.update(overrides)
    return {k: v for k, v in fields.items() if v is not None}


def small_layers() -> list[dict]:
    rng = np.random.default_rng(0)
    return [
        {"type": np.array([b"input"], "S10"), "shape": np.array([2, 6, 6]), "neuron": neuron(iDecay=np.int64(4096))},
        {"type": np.array([b"conv"], "S10"), "shape": np.array([4, 3, 3]), "neuron": neuron(),
         "weight": (2 * rng.integers(-60, 60, (4, 2, 3, 3, 1))).astype(np.float32), "bias": np.arange(4.0) * 20,
         "stride": np.array([2, 2]), "padding": np.array([1, 1]), "dilation": np.array([1, 1]), "groups": np.int64(1)},
        {"type": np.array([b"flatten"], "S10")},
        {"type": np.array([b"dense"], "S10"), "shape": np.array([5]), "neuron": neuron(),
         "weight": (2 * rng.integers(-100, 120, (5, 36))).astype(np.float32)},
    ]


def write_layers(path: Path, layers: list[dict]) -> Path:
    def put(group, values):
        for key, value in values.items():
            if isinstance(value, dict):
                put(group.create_group(key), value)
            else:
                group.create_dataset(key, data=value)
    with h5py.File(path, "w") as handle:
        put(handle.create_group("layer"), {str(i): layer for i, layer in enumerate(layers)})
    return path


def test_a_small_foreign_conv_file_runs_in_both_targets(tmp_path):
    path = write_layers(tmp_path / "small.net", small_layers())
    inputs = torch.randint(0, 300, (3, 2, 6, 6), generator=torch.Generator().manual_seed(1))
    fixed = load_emulator(path, timesteps=9).run(inputs)
    lava = load_lava(path, timesteps=9).run(inputs)
    assert spike_mismatches(lava, fixed) == {"layer0": 0, "layer1": 0, "layer2": 0}
    assert all(count > 0 for count in fixed.spike_counts().values())


BROKEN = [  # (what the issue measured or the format allows, how to break the small file, what the error says)
    ("vThMant 2^20", lambda L: L[1]["neuron"].update(vThMant=np.int64(1 << 20)), r"layer 1 neuron: vThMant .*0\.\.131071"),
    ("iDecay 9000", lambda L: L[1]["neuron"].update(iDecay=np.int64(9000)), r"iDecay ranges 9000\.\.9000.*0\.\.4096"),
    ("vDecay 5000", lambda L: L[3]["neuron"].update(vDecay=np.int64(5000)), r"layer 3 neuron: vDecay.*0\.\.4095"),
    ("weights 10^5", lambda L: L[3]["weight"].__setitem__((0, 0), 1e5), r"layer 3: weight ranges .*-256\.\.254"),
    ("bias 10^7", lambda L: L[1].update(bias=np.full(4, 1e7)), r"layer 1: bias .*-4096\.\.4095"),
    ("float weights", lambda L: L[3].update(weight=L[3]["weight"] + 0.5), r"weight holds non-integer values"),
    ("NaN weights", lambda L: L[1]["weight"].__setitem__((0, 0, 0, 0, 0), np.nan), r"weight holds NaN"),
    ("string weights", lambda L: L[3].update(weight=np.array([b"1"] * 180)), r"weight has dtype \|S1"),
    ("weight shape", lambda L: L[3].update(weight=np.zeros((5, 35), np.float32)), r"weight shape \[5, 35\] does not fit.*\(5, 36\)"),
    ("conv shape", lambda L: L[1].update(shape=np.array([4, 4, 4])), r"shape \[4, 4, 4\] is not what its convolution gives: \[4, 3, 3\]"),
    ("conv channels", lambda L: L[1].update(weight=np.zeros((4, 3, 3, 3), np.float32)), r"does not fit the layer"),
    ("float field", lambda L: L[1]["neuron"].update(vDecay=np.float64(512.5)), r"vDecay holds non-integer"),
    ("sigma-delta", lambda L: L[1]["neuron"].update(type=np.bytes_(b"SDNN")), r"sigma-delta \(SDNN\) neurons"),
    ("resonator", lambda L: L[3]["neuron"].update(type=np.bytes_(b"RF")), r"resonate-and-fire"),
    ("pooling", lambda L: L[1].update(type=np.array([b"pool"], "S10")), r"layer 1: is one of netx's pooling"),
    ("recurrent", lambda L: L[3].update(type=np.array([b"dense_rec"], "S10")), r"recurrent dense layers"),
    ("delays", lambda L: L[3].update(delay=np.ones(5)), r"synaptic delays \('delay'\)"),
    ("refractory", lambda L: L[1]["neuron"].update(refDelay=np.int64(3)), r"refDelay = 3: a refractory period"),
    ("graded spikes", lambda L: L[1]["neuron"].update(gradedSpike=np.bool_(True)), r"graded spikes"),
    ("message bits", lambda L: L[3]["neuron"].update(messageBits=np.int64(8)), r"graded spikes"),
    ("weight exponent", lambda L: L[1]["neuron"].update(type=np.bytes_(b"LOIHI"), wgtExp=np.int64(2)), r"wgtExp is not 0"),
    ("unknown neuron field", lambda L: L[1]["neuron"].update(vMinExp=np.int64(3)), r"vMinExp are not emulated"),
    ("no neuron", lambda L: L[3].pop("neuron"), r"layer 3: has no neuron group"),
    ("no flatten", lambda L: L.pop(2), r"needs a flatten layer"),
    ("bias per neuron", lambda L: L[1].update(bias=np.zeros(36)), r"bias has 36 values; one per channel \(4\)"),
    ("huge layer", lambda L: L[0].update(shape=np.array([4096, 4096, 4096])), r"more than the 16,777,216"),
    ("input not first", lambda L: L.insert(1, dict(L[0])), r"an input layer is only allowed first"),
    ("a gap", lambda L: L.__setitem__(2, {"kind": np.int64(1)}), r"layer 2: has no 'type'"),
]


@pytest.mark.parametrize("case, breaks, message", BROKEN, ids=[case for case, _, _ in BROKEN])
def test_fields_a_chip_cannot_run_are_refused_at_load_by_both_targets(case, breaks, message, tmp_path):
    layers = small_layers()
    breaks(layers)
    path = write_layers(tmp_path / "broken.net", layers)
    for load in (load_emulator, load_lava):
        with pytest.raises(NetxFormatError, match=message) as error:
            load(path)
        assert "broken.net" in str(error.value) and "\n" not in str(error.value)


# ---- our own files: checksum and metadata ---------------------------------------------------------
def our_network() -> NetxNetwork:
    rng = np.random.default_rng(0)
    layers = [NetxLayer("input", (6,), NeuronConfig(4096, 1024, 300)),
              NetxLayer("dense", (4,), NeuronConfig(4096, 4095, 131071), 2 * rng.integers(-100, 100, (4, 6)),
                        np.zeros(4, np.int64))]
    meta = {"timesteps": 5, "readout": "current", "pipeline_delay_steps": 1,
            "layers": [{"spike_name": "in", "exponent": 0, "spiking": True},
                       {"spike_name": None, "exponent": 2, "spiking": False}]}
    return NetxNetwork(layers, InputStage("dense", np.eye(6), np.zeros(6), 500.0, 0.0, (6,)), meta)


def test_our_files_carry_a_checksum_that_catches_any_bit_flip_in_their_numbers(tmp_path):
    path = tmp_path / "ours.net"
    write_network(path, our_network())
    network = read_network(path)
    assert len(network.metadata[CHECKSUM_KEY]) == 64
    with h5py.File(path, "r+") as handle:
        handle["layer/1/weight"][0, 0] += 2  # still in range: only the checksum sees it
    with pytest.raises(NetxFormatError, match="does not match its sha256"):
        load_emulator(path)
    write_network(path, our_network())
    with h5py.File(path, "r+") as handle:
        handle["stars/input/current_scale"][()] = 501.0
    with pytest.raises(NetxFormatError, match="does not match its sha256"):
        load_lava(path)


def rewrite_metadata(path: Path, change) -> None:
    """Edit our file's metadata and re-sign it, so that the metadata checks themselves are reached."""
    with h5py.File(path, "r+") as handle:
        metadata = json.loads(handle["stars/metadata"][()].decode())
        change(metadata)
        metadata[CHECKSUM_KEY] = content_sha256(handle, metadata)
        del handle["stars/metadata"]
        handle.create_dataset("stars/metadata", data=json.dumps(metadata).encode())


@pytest.mark.parametrize("change, message", [
    (lambda m: m.pop("layers"), r"'layers' must list one entry per layer \(2\)"),
    (lambda m: m.update(timesteps=0), r"timesteps = 0"),
    (lambda m: m.update(readout="spikes"), r"readout 'spikes' does not match"),
    (lambda m: m["layers"][1].update(exponent=1e9), r"exponent = 1000000000.0"),
    (lambda m: m.update(dt_s="fast"), r"dt_s = 'fast'"),
], ids=["no layers", "timesteps 0", "readout", "exponent", "dt_s"])
def test_our_metadata_is_validated_not_looked_up(change, message, tmp_path):
    path = tmp_path / "ours.net"
    write_network(path, our_network())
    rewrite_metadata(path, change)
    with pytest.raises(NetxFormatError, match=message):
        read_network(path)


def test_a_file_that_is_not_hdf5_or_is_a_directory_is_one_line(tmp_path, cli_main):
    (tmp_path / "junk.net").write_bytes(b"\x89HDF\r\n" + bytes(200))
    code, _, err = cli_main("simulate", "--target", "loihi", tmp_path / "junk.net", "--quiet")
    assert code == 2 and "junk.net" in err and "truncated or corrupt" in err and err.count("\n") == 1
    with pytest.raises(NetxFormatError, match="is a directory"):
        read_network(tmp_path)
