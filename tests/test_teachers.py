"""Teacher checkpoints: prefixes, missing buffers, wrong architectures, truncation, pickles."""

import pickle

import pytest
import torch

from stars_deploy.errors import CheckpointError, ConfigError
from stars_deploy.teachers import (ARCHITECTURES, CifarResNet, TeacherSpec, build_teacher, load_teacher,
                                   parse_normalization)


def test_registry_has_the_digits_cnn_and_the_cifar_resnets():
    for name in ("digits_cnn", "cifar_resnet20", "cifar_resnet32", "cifar_resnet44", "cifar_resnet56"):
        assert name in ARCHITECTURES


def test_cifar_resnet20_has_the_reference_key_layout():
    keys = CifarResNet(20).state_dict().keys()
    learnable = [k for k in keys if not k.endswith("num_batches_tracked")]
    assert len(learnable) == 97  # as many as the published akamaster checkpoint holds
    assert "layer3.2.bn2.running_var" in keys and "linear.bias" in keys


def test_option_a_shortcut_pads_channels():
    model = CifarResNet(20).eval()
    out = model.layer2[0](torch.randn(2, 16, 32, 32))
    assert out.shape == (2, 32, 16, 16)


@pytest.mark.parametrize("prefix, drop_counters", [("", False), ("module.", True), ("module.", False)])
def test_loads_with_or_without_prefix_and_counters(tmp_path, prefix, drop_counters):
    spec = TeacherSpec(arch="cifar_resnet20")
    source = build_teacher(spec)
    for module in source.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.normal_()
    state = {prefix + k: v for k, v in source.state_dict().items()
             if not (drop_counters and k.endswith("num_batches_tracked"))}
    torch.save({"best_prec1": 90.0, "state_dict": state}, tmp_path / "t.th")
    loaded = load_teacher(spec, tmp_path / "t.th")
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(loaded(x), source.eval()(x))
    assert not any(p.requires_grad for p in loaded.parameters())


def test_a_checkpoint_of_another_architecture_lists_every_problem(tmp_path):
    torch.save(build_teacher(TeacherSpec(arch="cifar_resnet32")).state_dict(), tmp_path / "r32.pt")
    with pytest.raises(CheckpointError) as info:
        load_teacher(TeacherSpec(arch="cifar_resnet20"), tmp_path / "r32.pt")
    message = str(info.value)
    assert "r32.pt" in message and "unexpected keys: layer1.3" in message and "missing keys: none" in message
    torch.save(build_teacher(TeacherSpec(arch="cifar_resnet20", num_classes=100)).state_dict(), tmp_path / "c100.pt")
    with pytest.raises(CheckpointError, match=r"mis-shaped keys: linear.weight \(100, 64\) != \(10, 64\)"):
        load_teacher(TeacherSpec(arch="cifar_resnet20"), tmp_path / "c100.pt")
    torch.save(build_teacher(TeacherSpec()).state_dict(), tmp_path / "digits.pt")
    with pytest.raises(CheckpointError, match=r"missing keys: layer1.0.conv1.weight.*mis-shaped keys: conv1.weight \(32, 1, 3, 3\) != \(16, 3, 3, 3\)"):
        load_teacher(TeacherSpec(arch="cifar_resnet20"), tmp_path / "digits.pt")


def test_truncated_and_missing_checkpoints(tmp_path):
    torch.save(build_teacher(TeacherSpec()).state_dict(), tmp_path / "full.pt")
    data = (tmp_path / "full.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cut.pt: the file is truncated"):
        load_teacher(TeacherSpec(), tmp_path / "cut.pt")
    with pytest.raises(CheckpointError, match="nothing.pt does not exist"):
        load_teacher(TeacherSpec(), tmp_path / "nothing.pt")


class Payload:
    """An object whose unpickling would run code: weights_only loading must refuse it."""

    ran = False

    def __reduce__(self):
        return (Payload._run, ())

    @staticmethod
    def _run():
        Payload.ran = True
        return {}


def test_a_pickle_that_would_execute_code_is_refused_without_running_it(tmp_path):
    with open(tmp_path / "evil.pt", "wb") as handle:
        torch.save({"state_dict": Payload()}, handle, pickle_module=pickle)
    with pytest.raises(CheckpointError, match="refusing to load"):
        load_teacher(TeacherSpec(), tmp_path / "evil.pt")
    assert Payload.ran is False


def test_normalization_presets_and_custom():
    assert parse_normalization("imagenet")[0] == (0.485, 0.456, 0.406)
    assert parse_normalization("0.5,0.5,0.5/0.25,0.25,0.25") == ((0.5,) * 3, (0.25,) * 3)
    with pytest.raises(ConfigError, match="neither a preset"):
        parse_normalization("imagenette")
    with pytest.raises(ConfigError, match="3 channels but digits_cnn takes 1"):
        TeacherSpec(normalization="imagenet").mean_std
    with pytest.raises(ConfigError, match="unknown teacher architecture"):
        TeacherSpec(arch="vgg11")
