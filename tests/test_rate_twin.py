"""The rate twin: the student's exact constant-current spike rate, sharing the student's weights."""

import pytest
import torch

from stars_deploy.errors import ConfigError
from stars_deploy.students import StudentConfig, build_student, student_family
from stars_deploy.students.neurons import LIFConfig, LIFSequence
from stars_deploy.students.rate import RateActivation, RateTwin, lif_count, rate_table


@pytest.mark.parametrize("steps, tau", [(4, 2.0), (8, 2.0), (4, 3.0), (6, 5.5)])
def test_the_rate_is_the_lif_spike_count_for_every_constant_current(steps, tau):
    lif = LIFConfig(tau_mem_steps=tau)
    currents = torch.cat([torch.linspace(-1, 3 * tau, 50_000), torch.tensor(rate_table(steps, lif)[0])])
    currents = torch.cat([currents, torch.nextafter(currents, torch.tensor(1e9))])  # both sides of every bound
    norse = LIFSequence(lif)(currents.view(1, -1).expand(steps, -1)).sum(0) / steps  # Norse's own cell
    assert torch.equal(RateActivation(steps, lif)(currents), norse)
    assert torch.equal(lif_count(currents, steps, lif) / steps, norse)


def test_the_staircase_for_the_default_neuron():
    bounds, rises, c_sat = rate_table(4, LIFConfig())
    assert [round(b, 4) for b in bounds] == [1.0667, 1.3333, 2.0] and rises == [0.25, 0.25, 0.5]
    assert c_sat == bounds[-1]


def test_the_twin_is_the_student_where_inputs_are_constant_and_shares_its_parameters():
    torch.manual_seed(0)
    student = build_student(StudentConfig(input_shape=(1, 8, 8), width=8, depth=3, timesteps=4)).eval()
    for module in student.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_var.uniform_(0.2, 0.5)
            module.bias.data.uniform_(0.8, 1.6)  # currents inside the ramp
    twin = RateTwin(student, student_family("convnet").rate_forward).eval()
    assert {id(p) for p in twin.parameters()} == {id(p) for p in student.parameters()}
    images = torch.rand(16, 1, 8, 8)
    first = student.layers[0]
    spikes = first.forward_constant(images, 4)  # direct encoding: the first layer's input is constant
    assert torch.equal(twin.activation(first.bn(first.conv(images))), spikes.mean(0))
    out = twin(images)
    assert out.logits.shape == (16, 10) and out.logits_t.shape == (1, 16, 10) and out.features.shape == (16, 32)
    snn = student(images)
    assert (out.logits.argmax(1) == snn.logits.argmax(1)).float().mean() >= 0.5  # deeper layers: rates vs trains
    out.logits.sum().backward()
    assert student.layers[2].conv.weight.grad.abs().sum() > 0  # training the twin trains the student


def test_other_neurons_have_no_twin():
    with pytest.raises(ConfigError, match="current-free LIF neurons that reset to 0"):
        rate_table(4, LIFConfig(tau_syn_steps=3.0))
    assert student_family("resnet").rate_forward is None
