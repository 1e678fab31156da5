"""LIF dynamics against golden trajectories computed by hand from the Euler equations."""

import pytest
import torch

from stars_deploy.errors import ConfigError
from stars_deploy.neurons import LIFConfig, LIFSequence


def run(config: LIFConfig, inputs: list[float]):
    cell = config.make_cell()
    state, spikes, voltages = None, [], []
    for x in inputs:
        z, state = cell(torch.tensor([x]), state)
        spikes.append(float(z.detach()))
        voltages.append(float(state.v))
    return spikes, voltages


def test_default_lif_halves_its_voltage_and_adds_half_the_input():
    # v_t = v/2 + x/2 (tau_mem = 2 steps); x = 1.5 -> 0.75, 1.125 (spike, reset to 0), 0.75, ...
    spikes, voltages = run(LIFConfig(), [1.5] * 4)
    assert spikes == [0, 1, 0, 1]
    assert voltages == pytest.approx([0.75, 0.0, 0.75, 0.0])


def test_threshold_is_strict():
    # x = 2: v reaches exactly 1.0 = v_th at step 1 and must not spike
    spikes, voltages = run(LIFConfig(), [2.0] * 4)
    assert spikes == [0, 1, 0, 1]
    assert voltages == pytest.approx([1.0, 0.0, 1.0, 0.0])


def test_cuba_lif_golden_trajectory():
    # i <- i + x; v <- v + (i - v)/2; spike; i <- i/2 (tau_syn = tau_mem = 2 steps)
    spikes, voltages = run(LIFConfig(tau_syn_steps=2.0), [1.0, 1.0, 1.0, 0.0])
    assert spikes == [0, 0, 1, 0]
    assert voltages == pytest.approx([0.5, 1.0, 0.0, 0.4375])


def test_time_constants_in_seconds_follow_dt():
    config = LIFConfig(tau_mem_steps=4.0, tau_syn_steps=8.0, dt_s=1e-4)
    assert config.tau_mem_s == pytest.approx(4e-4)
    assert config.tau_syn_s == pytest.approx(8e-4)
    # the decay per step depends only on tau in steps, whatever dt
    assert run(config, [1.0])[1] == pytest.approx(run(LIFConfig(tau_mem_steps=4.0, tau_syn_steps=8.0), [1.0])[1])


def test_sequence_matches_stepping_the_cell():
    config = LIFConfig(tau_mem_steps=3.0)
    currents = torch.rand(5, 2, 7) * 3
    spikes = LIFSequence(config)(currents)
    cell, state = config.make_cell(), None
    for t in range(5):
        z, state = cell(currents[t], state)
        assert torch.equal(z, spikes[t])


def test_surrogate_gradient_flows():
    currents = torch.full((3, 1, 4), 1.5, requires_grad=True)
    LIFSequence(LIFConfig()).forward(currents).sum().backward()
    assert float(currents.grad.abs().sum()) > 0


@pytest.mark.parametrize("values, match", [
    ({"tau_mem_steps": 0.5}, "tau_mem_steps"),
    ({"surrogate": "nope"}, "unknown surrogate"),
    ({"v_threshold": 0.0}, "v_threshold"),
])
def test_bad_neuron_parameters_are_refused(values, match):
    with pytest.raises(ConfigError, match=match):
        LIFConfig(**values)
