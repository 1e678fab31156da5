"""A seeded, time-bounded fuzz of the .net reader (issue 15): truncations, bit flips, out-of-range
and wrong-type fields, in our own files and in another tool's. Every case ends in a
NetxFormatError (one line naming the file) or in a file that loads and runs; a file of ours
that loads after a bit flip must give exactly the original result (its checksum covers every
number), so no changed result is ever accepted silently. Never any other exception."""

from __future__ import annotations

import time

import h5py
import numpy as np
import pytest
import torch

from stars_deploy.errors import StarsDeployError
from stars_deploy.exporters.netx_format import InputStage, NetxLayer, NetxNetwork, NeuronConfig, write_network
from stars_deploy.targets.loihi import load_emulator

SEED = 17
BUDGET_S = 40.0  # the whole fuzz, on one core; cases stop when it is spent
CASES_PER_KIND = 600
STEPS = 5


def our_file(path):
    rng = np.random.default_rng(0)
    layers = [NetxLayer("input", (2, 4, 4), NeuronConfig(4096, 1024, 200)),
              NetxLayer("conv", (3, 2, 2), NeuronConfig(2048, 512, 300), 2 * rng.integers(-100, 100, (3, 2, 3, 3)),
                        rng.integers(-50, 50, 3), stride=(2, 2), padding=(1, 1)),
              NetxLayer("dense", (4,), NeuronConfig(4096, 4095, 131071), 2 * rng.integers(-100, 100, (4, 12)),
                        np.zeros(4, np.int64), flatten_before=True)]
    meta = {"timesteps": STEPS, "readout": "current", "pipeline_delay_steps": 2,
            "layers": [{"spike_name": "a", "exponent": 0, "spiking": True},
                       {"spike_name": "b", "exponent": 0, "spiking": True},
                       {"spike_name": None, "exponent": 3, "spiking": False}]}
    stage = InputStage("conv", rng.standard_normal((2, 1, 3, 3)), rng.standard_normal(2), 800.0, 5.0, (1, 4, 4),
                       padding=(1, 1))
    write_network(path, NetxNetwork(layers, stage, meta))
    return path, torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(1))


def foreign_file(path):
    rng = np.random.default_rng(1)
    with h5py.File(path, "w") as handle:
        def layer(index, kind, shape, **datasets):
            group = handle.create_group(f"layer/{index}")
            group.create_dataset("type", data=np.array([kind.encode()], "S10"))
            if shape is not None:
                group.create_dataset("shape", data=np.array(shape))
                neuron = group.create_group("neuron")
                for key, value in (("type", np.bytes_(b"CUBA")), ("iDecay", np.int64(410)), ("vDecay", np.int64(410)),
                                   ("vThMant", np.int64(64)), ("refDelay", np.int64(1)), ("gradedSpike", np.bool_(False))):
                    neuron.create_dataset(key, data=value)
            for key, value in datasets.items():
                group.create_dataset(key, data=value)
        layer(0, "dense", [8], weight=(2 * rng.integers(-60, 100, (8, 10))).astype(np.float32))
        layer(1, "dense", [3], weight=(2 * rng.integers(-60, 100, (3, 8))).astype(np.float32))
    spikes = torch.from_numpy(np.random.default_rng(2).random((STEPS, 3, 10)) < 0.4).to(torch.int64)
    return path, spikes


def fields_of(path) -> list[str]:
    names = []
    with h5py.File(path, "r") as handle:
        handle.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None)
    return sorted(names)


WRONG_VALUES = [np.int64(-1), np.int64(1 << 40), np.float64(np.nan), np.float64(np.inf), np.float64(0.5),
                np.bytes_(b"x"), np.array([], np.int64), np.zeros((2, 2, 2, 2, 2, 2)), np.int64(4097),
                np.float32(1e30), np.array([1, 2, 3]), np.bool_(True), np.int64(0), np.int64(131072)]


def run_once(path, inputs):
    emulator = load_emulator(path, timesteps=STEPS)
    result = emulator.run(inputs)
    return result.logits_t, {k: v.clone() for k, v in result.spikes.items()}


def same(a, b) -> bool:
    return torch.equal(a[0], b[0]) and a[1].keys() == b[1].keys() and all(torch.equal(a[1][k], b[1][k]) for k in a[1])


@pytest.mark.parametrize("kind", ["ours", "foreign"])
def test_fuzzed_net_files_fail_cleanly_or_give_the_original_result(kind, tmp_path):
    rng = np.random.default_rng(SEED)
    original_path, inputs = (our_file if kind == "ours" else foreign_file)(tmp_path / "original.net")
    original = run_once(original_path, inputs)
    data = original_path.read_bytes()
    names = fields_of(original_path)
    deadline = time.monotonic() + BUDGET_S / 2
    outcomes = {"refused": 0, "same": 0, "changed": 0}
    for case in range(CASES_PER_KIND):
        if time.monotonic() > deadline:
            break
        path = tmp_path / f"case{case}.net"
        mutation = case % 3
        if mutation == 0:  # truncation
            path.write_bytes(data[:int(rng.integers(0, len(data)))])
            what = "truncated"
        elif mutation == 1:  # a bit flip anywhere
            flipped = bytearray(data)
            position = int(rng.integers(0, len(flipped)))
            flipped[position] ^= 1 << int(rng.integers(0, 8))
            path.write_bytes(bytes(flipped))
            what = f"bit flip at byte {position}"
        else:  # a field replaced by an out-of-range or wrong-type value
            path.write_bytes(data)
            name = names[int(rng.integers(0, len(names)))]
            value = WRONG_VALUES[int(rng.integers(0, len(WRONG_VALUES)))]
            with h5py.File(path, "r+") as handle:
                del handle[name]
                handle.create_dataset(name, data=value)
            what = f"{name} = {value!r}"
        try:
            result = run_once(path, inputs)
        except StarsDeployError as error:
            message = str(error)
            assert "\n" not in message and path.name in message, f"{what}: {message}"
            outcomes["refused"] += 1
            continue
        except Exception as error:  # noqa: BLE001 - the point: nothing but our one-line errors
            pytest.fail(f"{kind}, {what}: {type(error).__name__}: {error} (a traceback, not a clean error)")
        if same(result, original):
            outcomes["same"] += 1
            continue
        # a changed result may only come from another tool's file (validated, not checksummed),
        # and only from a field change the validation allows
        assert kind == "foreign", f"{what}: our file loaded with a changed result (the checksum missed it)"
        outcomes["changed"] += 1
    assert outcomes["refused"] >= 20, outcomes  # the fuzz reached the reader's checks
