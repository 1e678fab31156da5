"""Data-free ANN-to-SNN conversion (stars_deploy/conversion.py) on the digits teacher, calibrated
on synthetic images made from the teacher alone."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from stars_deploy.conversion import ConvertedNetwork, IFSite
from stars_deploy.data import load_eval_data
from stars_deploy.distillation.synthesis import PixelSynthesizer, SynthesisConfig
from stars_deploy.errors import ConfigError
from stars_deploy.teachers import Normalizer, TeacherSpec, load_teacher


@pytest.fixture(scope="module")
def converted(digits_teacher):
    spec = TeacherSpec(arch="digits_cnn")
    teacher = load_teacher(spec, digits_teacher[0])
    normalizer = Normalizer(*spec.mean_std)
    torch.manual_seed(0)
    synthesizer = PixelSynthesizer(teacher, normalizer, SynthesisConfig(batch_size=128, steps=30), 10, False)
    synthetic, _ = synthesizer.synthesize(None, spec.input_shape, torch.device("cpu"))
    network = ConvertedNetwork(teacher)
    thresholds = network.calibrate(synthetic)
    test = load_eval_data("digits")
    return teacher, network, thresholds, normalizer(test.images), test.labels


def site_outputs(network, images, timesteps=None):
    """Every site's output: the ANN's activation, or the SNN's mean output over the steps."""
    sums = [0.0] * len(network.sites)

    def keep(index):
        def hook(module, inputs, output):
            sums[index] = sums[index] + output
        return hook

    handles = [site.register_forward_hook(keep(i)) for i, site in enumerate(network.sites)]
    try:
        if timesteps is None:
            network(images)
            return sums
        network.simulate(images, timesteps)
        return [total / timesteps for total in sums]
    finally:
        for handle in handles:
            handle.remove()


def test_every_relu_becomes_a_site_with_a_threshold_from_synthetic_images(converted):
    teacher, network, thresholds, _, _ = converted
    assert len(network.sites) == 3  # the digits CNN's three ReLUs
    assert all(t > 0 for t in thresholds)
    assert [float(s.threshold) for s in network.sites] == thresholds


def test_the_first_sites_rate_is_the_clamped_activation_within_half_a_step(converted):
    _, network, thresholds, images, _ = converted
    ann = site_outputs(network, images[:64])[0]
    for timesteps in (4, 16, 64):
        snn = site_outputs(network, images[:64], timesteps)[0]
        target = ann.clamp(max=thresholds[0])
        assert (snn - target).abs().max() <= thresholds[0] / (2 * timesteps) + 1e-5  # constant input: exact bound


def test_deeper_rates_track_the_ann_closer_with_more_steps(converted):
    _, network, thresholds, images, _ = converted
    ann = site_outputs(network, images[:64])
    errors = {}
    for timesteps in (8, 64):
        snn = site_outputs(network, images[:64], timesteps)
        errors[timesteps] = [float((s - a.clamp(max=t)).abs().mean() / t) for s, a, t in zip(snn, ann, thresholds)]
    assert all(late < early for early, late in zip(errors[8], errors[64]))
    assert max(errors[64]) < 0.02  # mean error under 2 % of the threshold at every site


def test_the_converted_teacher_predicts_what_the_teacher_predicts(converted):
    teacher, network, _, images, labels = converted
    with torch.no_grad():
        ann = teacher(images).argmax(1)
    logits, spikes = network.simulate(images, 32)
    assert float((logits.argmax(1) == ann).float().mean()) >= 0.9
    assert float((logits.argmax(1) == labels).float().mean()) >= float((ann == labels).float().mean()) - 0.05
    assert spikes > 0
    assert all(site.mode == "ann" and site.w is None for site in network.sites)  # left as the ANN


def test_a_teacher_without_relu_or_untraceable_is_refused_in_one_line():
    with pytest.raises(ConfigError, match="has no ReLU"):
        ConvertedNetwork(nn.Sequential(nn.Linear(4, 4), nn.Tanh()))

    class Branching(nn.Module):
        def forward(self, x):
            return F.relu(x) if x.sum() > 0 else x

    with pytest.raises(ConfigError, match="cannot be traced by torch.fx"):
        ConvertedNetwork(Branching())
    network = ConvertedNetwork(nn.Sequential(nn.Linear(4, 4), nn.ReLU()))
    with pytest.raises(ConfigError, match="timesteps must be at least 1"):
        network.simulate(torch.zeros(1, 4), 0)
    with pytest.raises(ConfigError, match="percentile must be in"):
        network.calibrate(torch.zeros(1, 4), 0.0)


@pytest.mark.parametrize("reset, start, spikes", [("subtract", 0.5, 6), ("zero", 0.5, 5), ("subtract", 0.0, 5),
                                                  ("zero", 0.0, 5)])
def test_a_constant_current_fires_as_the_reset_rule_says(reset, start, spikes):
    # threshold 1, current 3/8 (exact in binary), 16 steps, spike when v > 1 (strict, as NIR's
    # Threshold and Norse). By subtraction the remainder is kept: from v0 = 1/2, v = 1/2 + 3k/8 - n
    # crosses 1 at steps 2, 5, 7, 10, 13, 15 (6 spikes); from v0 = 0 at 3, 6, 9, 11, 14 (5: v ends
    # at exactly 1.0, not above). Reset to zero drops it: from the first spike on, one every
    # ceil(8/3) = 3 steps: steps 2, 5, 8, 11, 14 from v0 = 1/2 and 3, 6, 9, 12, 15 from v0 = 0
    site = IFSite(reset, start)
    site.mode = "snn"
    out = sum(site(torch.full((1,), 0.375)) for _ in range(16))
    assert float(out) == spikes == float(site.spikes)


def test_an_unknown_reset_is_refused(converted):
    with pytest.raises(ConfigError, match="reset 'hold'"):
        ConvertedNetwork(converted[0], reset="hold")
    with pytest.raises(ConfigError, match="start potential"):
        ConvertedNetwork(converted[0], start=1.0)
