import math

import pytest
import torch
from torch import nn

from stars_deploy.distillation.objectives import (StudentProbe, TeacherProbe, adversarial_loss, bn_statistics_loss,
                                                  cosine_gram, gaussian_tail, hard_exceedance, kd_loss,
                                                  matching_layers, rca_loss, soft_exceedance, student_tail_loss,
                                                  tar_layer_loss, total_variation)
from stars_deploy.errors import ConfigError


def test_bn_loss_is_zero_when_the_batch_matches_the_running_statistics():
    x = torch.randn(64, 5, 6, 6) * 3 + 2
    mean = x.mean(dim=(0, 2, 3))
    var = x.var(dim=(0, 2, 3), unbiased=False)
    assert float(bn_statistics_loss(x, mean, var)) == pytest.approx(0.0, abs=1e-5)


def test_bn_loss_is_the_l2_norm_of_mean_and_biased_variance_differences():
    x = torch.randn(32, 3, 4, 4)
    mean, var = x.mean(dim=(0, 2, 3)), x.var(dim=(0, 2, 3), unbiased=False)
    shift = torch.tensor([3.0, 4.0, 0.0])  # norm 5
    scale = torch.tensor([0.0, 0.0, 2.0])  # norm 2
    assert float(bn_statistics_loss(x, mean - shift, var - scale)) == pytest.approx(7.0, rel=1e-5)


def test_gaussian_tail_values():
    assert gaussian_tail(1.0) == pytest.approx(0.158655, abs=1e-6)
    assert gaussian_tail(2.0) == pytest.approx(0.022750, abs=1e-6)


def test_soft_exceedance_tends_to_the_hard_rate_as_temperature_shrinks():
    u = torch.randn(16, 4, 8, 8) * 1.7 + 0.3
    gamma = torch.tensor([1.0, -2.0, 0.5, 1.5])
    beta = torch.tensor([0.0, 0.3, -1.0, 0.2])
    for k in (1.0, 2.0):
        hard = hard_exceedance(u, gamma, beta, k)
        errors = [float((soft_exceedance(u, gamma, beta, k, s) - hard).abs().max()) for s in (0.3, 0.1, 0.01, 1e-4)]
        assert errors == sorted(errors, reverse=True)
        assert errors[-1] < 1e-3


def test_tar_is_near_zero_for_gaussian_bn_outputs_and_large_for_heavy_tails():
    gamma, beta = torch.tensor([2.0, 0.5]), torch.tensor([1.0, -1.0])
    gaussian = torch.randn(512, 2, 8, 8) * gamma.view(1, -1, 1, 1) + beta.view(1, -1, 1, 1)
    small = float(tar_layer_loss(gaussian, gamma, beta, (1.0, 2.0), temperature=1e-3))
    assert small < 1e-4
    heavy = torch.distributions.StudentT(1.0).sample((512, 2, 8, 8)) * gamma.view(1, -1, 1, 1) + beta.view(1, -1, 1, 1)
    assert float(tar_layer_loss(heavy, gamma, beta, (1.0, 2.0), temperature=1e-3)) > 100 * small


def test_rca_is_zero_for_identical_relations_across_widths():
    teacher = torch.randn(16, 64)
    student = torch.cat([teacher, teacher], dim=1) * 3.0  # other width, same cosine relations
    for variant in ("gram", "sp", "rkd"):
        assert float(rca_loss(teacher, student[:, :64] if variant == "rkd" else student, variant)) == pytest.approx(0, abs=1e-6)
    assert float(rca_loss(teacher, torch.randn(16, 10))) > 0.01


def test_rca_gram_matches_its_definition():
    h_a, h_s = torch.randn(8, 12), torch.randn(8, 5)
    def gram(h):
        unit = h / h.norm(dim=1, keepdim=True)
        return unit @ unit.T
    expected = ((gram(h_a) - gram(h_s)) ** 2).sum() / 64
    assert float(rca_loss(h_a, h_s, "gram")) == pytest.approx(float(expected), rel=1e-5)
    assert torch.allclose(cosine_gram(h_a).diagonal(), torch.ones(8))


def test_rca_unknown_variant_is_refused():
    with pytest.raises(ValueError, match="unknown RCA variant"):
        rca_loss(torch.randn(4, 3), torch.randn(4, 3), "nope")


def test_kd_loss_zero_for_equal_logits_and_scaled_by_tau_squared():
    z = torch.randn(10, 7)
    assert float(kd_loss(z, z, 20.0)) == pytest.approx(0.0, abs=1e-6)
    other = torch.randn(10, 7)
    p = torch.softmax(other / 4, 1)
    expected = (p * (p.log() - torch.log_softmax(z / 4, 1))).sum(1).mean() * 16
    assert float(kd_loss(z, other, 4.0)) == pytest.approx(float(expected), rel=1e-5)


def test_adversarial_loss_counts_only_agreeing_samples():
    teacher = torch.tensor([[5.0, 0.0], [5.0, 0.0]])
    student = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # first agrees, second does not
    loss = adversarial_loss(student, teacher)
    first = kd_loss(student[:1], teacher[:1], 1.0)
    assert float(loss) == pytest.approx(-float(first) / 2, rel=1e-5)


def test_total_variation_of_constant_image_is_zero():
    assert float(total_variation(torch.ones(2, 3, 5, 5))) == 0.0
    assert float(total_variation(torch.arange(4.0).repeat(2, 1).view(1, 1, 2, 4))) == pytest.approx(1.0)


def test_teacher_probe_collects_one_bn_and_tar_term_per_layer_only_while_active():
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4)).eval()
    layers = [(n, m) for n, m in net.named_modules() if isinstance(m, nn.BatchNorm2d)]
    probe = TeacherProbe(layers)
    probe.want_tar = True
    net(torch.randn(2, 1, 8, 8))
    assert probe.bn_terms == [] and probe.tar_terms == []
    probe.active = True
    x = torch.randn(8, 1, 8, 8, requires_grad=True)
    net(x)
    assert len(probe.bn_terms) == 2 and len(probe.tar_terms) == 2
    bn, tar, rates = probe.collect()
    assert rates.numel() == 0  # want_rates is off
    (bn + tar).backward()
    assert x.grad is not None and float(x.grad.abs().sum()) > 0
    assert probe.bn_terms == []
    probe.remove()
    net(x)
    assert probe.bn_terms == []
    assert math.isfinite(float(tar.detach()))


def test_rca_ignores_silent_samples_and_keeps_gradients_bounded():
    teacher = torch.rand(6, 16)
    student = torch.rand(6, 8)
    student[2] = 0.0  # a sample on which the student's last stage never fired
    student.requires_grad_(True)
    loss = rca_loss(teacher, student)
    loss.backward()
    assert torch.isfinite(student.grad).all() and float(student.grad.abs().max()) < 10
    assert float(student.grad[2].abs().sum()) == 0.0
    keep = [0, 1, 3, 4, 5]
    expected = rca_loss(teacher[keep], student.detach()[keep]) * (5 / 6) ** 2
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)


def test_grouped_bn_loss_is_the_mean_of_each_group_matched_on_its_own():
    torch.manual_seed(0)
    x = torch.randn(12, 3, 4, 4) * torch.tensor([1.0, 2.0, 0.5]).view(1, 3, 1, 1)
    mean, var = torch.rand(3), torch.rand(3) + 0.5
    separate = [bn_statistics_loss(part, mean, var) for part in x.split(4)]
    torch.testing.assert_close(bn_statistics_loss(x, mean, var, groups=3), torch.stack(separate).mean())
    assert not torch.allclose(bn_statistics_loss(x, mean, var, groups=3), bn_statistics_loss(x, mean, var))


def test_bn_groups_must_divide_the_batch():
    from stars_deploy.errors import ConfigError
    from stars_deploy.distillation.synthesis import SynthesisConfig

    with pytest.raises(ConfigError, match="--bn-groups 3 must be at least 1 and divide --batch-size 128"):
        SynthesisConfig(batch_size=128, bn_groups=3)


def test_bn_momentum_matches_the_blend_of_the_batch_with_its_history():
    x = torch.randn(32, 3, 4, 4) * 2 + 1
    mean, var = x.mean(dim=(0, 2, 3)), x.var(dim=(0, 2, 3), unbiased=False)
    history = (torch.tensor([0.5, -1.0, 2.0]), torch.tensor([1.0, 3.0, 0.25]))
    blend = (0.2 * mean + 0.8 * history[0], 0.2 * var + 0.8 * history[1])
    assert float(bn_statistics_loss(x, *blend, history=history, momentum=0.8)) == pytest.approx(0.0, abs=1e-5)
    assert float(bn_statistics_loss(x, mean, var, history=history, momentum=0.8)) > 1.0  # the batch alone no longer


def test_teacher_probe_keeps_a_running_history_of_batch_statistics():
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4)).eval()
    probe = TeacherProbe([("1", net[1])], bn_momentum=0.9)
    probe.active = True
    stats = []
    for _ in range(2):
        x = torch.randn(8, 1, 6, 6)
        with torch.no_grad():
            u = net[0](x)
        stats.append((u.mean(dim=(0, 2, 3)), u.var(dim=(0, 2, 3), unbiased=False)))
        net(x)
        probe.collect()
        probe.end_batch()
    (mean, var), = probe.history
    torch.testing.assert_close(mean, 0.9 * stats[0][0] + 0.1 * stats[1][0])
    torch.testing.assert_close(var, 0.9 * stats[0][1] + 0.1 * stats[1][1])
    probe.remove()


def test_teacher_probe_measures_the_share_of_each_bn_output_that_the_relu_passes():
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4)).eval()
    with torch.no_grad():
        net[1].bias.fill_(-100.0)  # nothing passes the first ReLU
    probe = TeacherProbe([(n, m) for n, m in net.named_modules() if isinstance(m, nn.BatchNorm2d)])
    probe.active = probe.want_rates = True
    x = torch.randn(8, 1, 8, 8)
    net(x)
    _, _, rates = probe.collect()
    second = net[4](net[3](net[2](net[1](net[0](x)))))
    assert rates.tolist() == pytest.approx([0.0, float((second > 0).float().mean())])


def test_matching_layers_pair_each_student_layer_with_the_teacher_layer_at_its_relative_depth():
    assert matching_layers(3, 19) == [0, 9, 18]
    assert matching_layers(2, 5) == [0, 4]
    assert matching_layers(1, 5) == [4]


def test_student_tail_loss_matches_its_definition():
    theta = 2.0
    at_threshold = torch.full((4, 3, 2, 2), theta)  # sigma(0) = 1/2 in every channel
    far_above = torch.full((4, 2, 2, 2), 100.0)  # sigma -> 1
    rates = torch.tensor([0.5, 0.9, 0.25])
    loss = student_tail_loss([at_threshold, far_above], [theta, theta], rates, 0.1)
    assert float(loss) == pytest.approx(0.0 + (1 - 0.25) ** 2)  # layers 0 and 1 -> teacher layers 0 and 2
    currents = torch.randn(6, 3, 4, 4, requires_grad=True)
    student_tail_loss([currents], [0.5], torch.tensor([0.3]), 0.1).backward()
    assert float(currents.grad.abs().sum()) > 0


def test_the_firing_current_is_where_the_lif_starts_to_fire_and_where_the_twins_staircase_starts():
    from stars_deploy.students.neurons import LIFConfig
    from stars_deploy.students.rate import firing_current, lif_count, rate_table

    for steps, lif in ((4, LIFConfig()), (8, LIFConfig(tau_mem_steps=4.0)), (4, LIFConfig(v_leak=0.25))):
        theta = firing_current(steps, lif)
        counts = lif_count(torch.tensor([theta * 0.999, theta * 1.001]), steps, lif)
        assert counts.tolist() == [0.0, 1.0]
        if lif.v_leak == 0:
            assert rate_table(steps, lif)[0][0] == pytest.approx(theta, rel=1e-5)
    with pytest.raises(ConfigError, match="current-free"):
        firing_current(4, LIFConfig(tau_syn_steps=2.0))


@pytest.mark.parametrize("twin", [False, True])
def test_student_probe_records_every_neuron_layers_current_and_its_firing_current(twin):
    from stars_deploy.students import StudentConfig, build_student, student_family
    from stars_deploy.students.rate import RateTwin, firing_current

    student = build_student(StudentConfig(input_shape=(1, 8, 8), num_classes=10, timesteps=4))
    model = RateTwin(student, student_family("convnet").rate_forward) if twin else student
    images = torch.randn(5, 1, 8, 8)
    with StudentProbe(model) as probe:
        model(images)
    layers = len(student.layers)
    assert len(probe.currents) == len(probe.firing_currents) == layers
    assert all(current.shape[0] == (5 if twin else 4 * 5) for current in probe.currents)
    first = student.layers[0].bn(student.layers[0].conv(images))
    torch.testing.assert_close(probe.currents[0][:5], first)  # the first layer's current (step 0 when spiking)
    assert probe.firing_currents == pytest.approx([firing_current(4, student.config.lif)] * layers, rel=1e-5)
    model(images)  # the hooks are gone after the block
    assert len(probe.currents) == layers
