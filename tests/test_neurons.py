"""LIF dynamics against golden trajectories computed by hand from the Euler equations."""

import pytest
import torch

from stars_deploy.errors import ConfigError
from stars_deploy.students.neurons import LIFConfig, LIFSequence, resolve_lif_kernel, set_lif_kernel


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


@pytest.mark.parametrize("kernel", ["fused", "compiled"])
@pytest.mark.parametrize("config", [LIFConfig(), LIFConfig(tau_mem_steps=3.0, v_leak=0.1, v_reset=-0.2)])
def test_fused_lif_gives_norse_spikes_and_gradients(config, kernel):
    """The one-node LIF (eager, and torch.compile'd into fused kernels) against Norse's step
    function: the same spikes bit for bit (inputs placed exactly at the threshold included)
    and the same surrogate gradients."""
    torch.manual_seed(0)
    norse_path, fused_path = LIFSequence(config), LIFSequence(config)
    assert set_lif_kernel(fused_path, kernel) == 1
    currents = torch.randn(6, 32, 4, 5, 5) * 2
    currents[:, 0] = 2.0  # v lands exactly on v_th = 1 at step 1 for the default neuron
    inputs = [currents.clone().requires_grad_(True) for _ in range(2)]
    spikes = [norse_path(inputs[0]), fused_path(inputs[1])]
    assert torch.equal(spikes[0], spikes[1])
    assert 0 < spikes[0].mean() < 1
    weights = torch.randn_like(spikes[0])
    for s in spikes:
        (s * weights).sum().backward()
    assert inputs[0].grad.abs().max() > 0.1
    torch.testing.assert_close(inputs[1].grad, inputs[0].grad, rtol=1e-5, atol=1e-6)


def test_fused_lif_leaves_cuba_neurons_on_norse_and_checks_names():
    assert set_lif_kernel(LIFSequence(LIFConfig(tau_syn_steps=2.0)), "fused") == 0
    with pytest.raises(ConfigError, match="LIF kernel 'triton'"):
        set_lif_kernel(LIFSequence(LIFConfig()), "triton")
    assert resolve_lif_kernel("auto", torch.device("cpu")) == "norse"
    assert resolve_lif_kernel("auto", torch.device("cuda")) == "compiled"
