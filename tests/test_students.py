"""Students: the layer-by-layer execution equals stepping the network one timestep at a time."""

import pytest
import torch

from stars_deploy.errors import CheckpointError, ConfigError
from stars_deploy.students.neurons import LIFConfig, set_lif_kernel
from stars_deploy.students import (StudentConfig, build_student, convnet_layout, load_student,
                                   save_student)


def randomise_bn(model):
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 1.5)
            module.weight.data.uniform_(0.5, 2.0)
            module.bias.data.uniform_(-0.2, 0.6)
    return model.eval()


def stepwise_convnet(model, images):
    """Reference: the whole network advanced one timestep at a time with Norse cells."""
    states = [None] * len(model.layers)
    spikes = {f"layers.{i}": [] for i in range(len(model.layers))}
    logits = []
    for _ in range(model.config.timesteps):
        x = images
        for index, layer in enumerate(model.layers):
            x, states[index] = layer.lif.cell(layer.bn(layer.conv(x)), states[index])
            spikes[f"layers.{index}"].append(x)
        logits.append(model.readout(x.flatten(1)))
    return {k: torch.stack(v) for k, v in spikes.items()}, torch.stack(logits)


def stepwise_resnet(model, images):
    names = ["stem"] + [f"blocks.{i}.{part}" for i in range(len(model.blocks)) for part in ("first", "out")]
    states = {name: None for name in names}
    spikes = {name: [] for name in names}
    logits = []
    for _ in range(model.config.timesteps):
        x, states["stem"] = model.stem.lif.cell(model.stem.bn(model.stem.conv(images)), states["stem"])
        spikes["stem"].append(x)
        for index, block in enumerate(model.blocks):
            name = f"blocks.{index}"
            hidden, states[f"{name}.first"] = block.first.lif.cell(block.first.bn(block.first.conv(x)), states[f"{name}.first"])
            current = block.bn2(block.conv2(hidden)) + block.shortcut(x)
            x, states[f"{name}.out"] = block.lif.cell(current, states[f"{name}.out"])
            spikes[f"{name}.first"].append(hidden)
            spikes[f"{name}.out"].append(x)
        logits.append(model.readout(x.mean(dim=(2, 3))))
    return {k: torch.stack(v) for k, v in spikes.items()}, torch.stack(logits)


@pytest.mark.parametrize("family, depth, reference", [("convnet", 3, stepwise_convnet),
                                                      ("resnet", 14, stepwise_resnet)])
@pytest.mark.parametrize("lif", [LIFConfig(), LIFConfig(tau_mem_steps=3.0, tau_syn_steps=2.0)])
def test_layer_by_layer_equals_stepwise_spike_for_spike(family, depth, reference, lif):
    config = StudentConfig(family=family, input_shape=(1, 8, 8), width=8, depth=depth, timesteps=5, lif=lif)
    model = randomise_bn(build_student(config))
    images = torch.randn(6, 1, 8, 8) * 2
    with torch.no_grad():
        out = model(images)
        spikes, logits_t = reference(model, images)
    assert list(out.spikes) == list(spikes)
    total = 0
    for name in spikes:
        assert torch.equal(out.spikes[name], spikes[name]), name
        total += int(spikes[name].sum())
    assert total > 50  # the comparison is not between silent networks
    torch.testing.assert_close(out.logits_t, logits_t, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.logits, logits_t.mean(0))


def test_shapes_and_features():
    for family, depth in (("convnet", 4), ("resnet", 8)):
        config = StudentConfig(family=family, input_shape=(3, 32, 32), width=8, depth=depth, timesteps=2)
        out = build_student(config)(torch.randn(3, 3, 32, 32))
        assert out.logits.shape == (3, 10) and out.logits_t.shape == (2, 3, 10)
        assert out.features.shape[0] == 3 and out.features.dim() == 2
        assert all(s.shape[:2] == (2, 3) for s in out.spikes.values())


def test_convnet_layout_strides_down_to_two_by_two():
    assert convnet_layout((1, 8, 8), 32, 3) == [(32, 1), (64, 2), (128, 2)]
    assert convnet_layout((3, 32, 32), 16, 6) == [(16, 1), (32, 2), (64, 2), (128, 2), (128, 2), (128, 1)]


def test_save_and_load_round_trip(tmp_path):
    config = StudentConfig(width=4, lif=LIFConfig(tau_syn_steps=3.0))
    model = randomise_bn(build_student(config))
    save_student(tmp_path / "s.pt", model)
    loaded = load_student(tmp_path / "s.pt")
    assert loaded.config == config
    images = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(model(images).logits, loaded(images).logits)


def test_a_teacher_checkpoint_is_not_a_student(tmp_path):
    torch.save({"weight": torch.zeros(2)}, tmp_path / "x.pt")
    with pytest.raises(CheckpointError, match="not a stars-deploy student"):
        load_student(tmp_path / "x.pt")


@pytest.mark.parametrize("values, match", [({"family": "transformer"}, "unknown student"),
                                           ({"family": "resnet", "depth": 9}, "6n\\+2"),
                                           ({"timesteps": 0}, "timesteps")])
def test_bad_student_configs(values, match):
    with pytest.raises(ConfigError, match=match):
        StudentConfig(**values)


@pytest.mark.parametrize("kernel", ["fused", "compiled"])
@pytest.mark.parametrize("family,depth", [("convnet", 3), ("resnet", 8)])
def test_fused_lif_student_matches_the_norse_student(family, depth, kernel):
    """The fast path used in distillation against the Norse reference, whole network: every
    layer's spikes equal, logits equal, and the weight gradients equal to float rounding."""
    torch.manual_seed(0)
    config = StudentConfig(family=family, depth=depth, width=8, timesteps=5)
    reference = build_student(config)
    fast = build_student(config)
    fast.load_state_dict(reference.state_dict())
    assert set_lif_kernel(fast, kernel) > 0
    images = torch.randn(16, 1, 8, 8) * 2
    out_ref, out_fast = reference(images), fast(images)
    assert out_ref.spikes.keys() == out_fast.spikes.keys()
    for name in out_ref.spikes:
        assert torch.equal(out_ref.spikes[name], out_fast.spikes[name]), name
    assert torch.equal(out_ref.logits, out_fast.logits)
    out_ref.logits.square().sum().backward()
    out_fast.logits.square().sum().backward()
    for (name, a), b in zip(reference.named_parameters(), fast.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6, msg=name)
