"""Teachers the package does not know: an nn.Module defined here, and its torch.export program."""

from __future__ import annotations

import io
import os
import pickle
import zipfile

import pytest
import torch
from torch import nn

from stars_deploy.errors import CheckpointError, ConfigError
from stars_deploy.teachers import batchnorm_layers
from stars_deploy.teachers.adapters import ClassifierTeacher, check_teacher, load_program, program_teacher


class TinyNet(nn.Module):
    """A small classifier the package has never seen: conv-BN-ReLU twice, pool, linear."""

    def __init__(self, classes: int = 5):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU(),
                                      nn.Conv2d(6, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.classifier = nn.Linear(8, classes)

    def forward(self, x):
        return self.classifier(self.features(x).mean((2, 3)))


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    model = TinyNet().eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    return model


def test_a_module_gets_its_head_and_penultimate_features(tiny):
    x = torch.rand(7, 3, 12, 12)
    teacher = ClassifierTeacher(tiny, x[:2])
    assert teacher.head is tiny.classifier
    features = teacher.penultimate(x)
    assert features.shape == (7, 8)
    assert torch.equal(teacher.head(features), tiny(x)) and torch.equal(teacher(x), tiny(x))
    assert [name for name, _ in batchnorm_layers(teacher)] == ["module.features.1", "module.features.4"]


def test_a_module_without_an_output_linear_uses_its_logits(tiny):
    model = nn.Sequential(tiny, nn.Softmax(1)).eval()
    teacher = ClassifierTeacher(model, torch.rand(2, 3, 12, 12))
    assert isinstance(teacher.head, nn.Identity)
    x = torch.rand(3, 3, 12, 12)
    assert torch.equal(teacher.penultimate(x), model(x))


def test_teachers_distillation_cannot_use_are_refused(tiny):
    with pytest.raises(ConfigError, match="has no BatchNorm2d layer"):
        check_teacher(nn.Sequential(nn.Flatten(), nn.Linear(12, 5)), (3, 2, 2), 5, "flat")
    with pytest.raises(ConfigError, match=r"returns shape \(1, 5\) for 1 images, expected \(1, 10\)"):
        check_teacher(tiny, (3, 12, 12), 10, "tiny")
    check_teacher(tiny, (3, 12, 12), 5, "tiny")


def export(model, path, dynamic=True):
    x = torch.rand(4, 3, 12, 12)
    shapes = ({0: torch.export.Dim("batch", min=1)},) if dynamic else None
    torch.export.save(torch.export.export(model, (x,), dynamic_shapes=shapes), str(path))


def test_an_exported_program_becomes_a_teacher_with_real_batchnorm_modules(tiny, tmp_path):
    export(tiny, tmp_path / "tiny.pt2")
    teacher, shape = program_teacher(tmp_path / "tiny.pt2")
    assert shape == (3, 12, 12)
    layers = [module for _, module in batchnorm_layers(teacher)]
    originals = [module for module in tiny.modules() if isinstance(module, nn.BatchNorm2d)]
    assert len(layers) == 2
    for layer, original in zip(layers, originals):
        assert not layer.training and torch.equal(layer.running_var, original.running_var)
    seen = []
    layers[1].register_forward_hook(lambda module, inputs, output: seen.append(inputs[0].shape))
    x = torch.rand(9, 3, 12, 12)
    assert torch.allclose(teacher(x), tiny(x), atol=1e-6)
    assert torch.allclose(teacher.head(teacher.penultimate(x)), tiny(x), atol=1e-6)
    assert seen[0] == (9, 8, 6, 6) and isinstance(teacher.head, nn.Linear)
    check_teacher(teacher, shape, 5, "tiny.pt2")


def test_a_program_with_a_fixed_batch_is_refused_with_advice(tiny, tmp_path):
    export(tiny, tmp_path / "fixed.pt2", dynamic=False)
    with pytest.raises(ConfigError, match="export programs with a dynamic batch dimension"):
        program_teacher(tmp_path / "fixed.pt2")


def test_a_program_file_that_would_unpickle_code_is_refused_without_running_it(tiny, tmp_path):
    """Every torch.load inside torch.export.load is forced to weights_only: a payload planted in
    the archive's weights is refused, and never runs."""
    export(tiny, tmp_path / "tiny.pt2")
    marker = tmp_path / "pwned"

    class RunsCode:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    buffer = io.BytesIO()
    torch.save({"weights": RunsCode()}, buffer, pickle_module=pickle)
    with zipfile.ZipFile(tmp_path / "tiny.pt2") as source, zipfile.ZipFile(tmp_path / "evil.pt2", "w") as target:
        for item in source.infolist():
            data = source.read(item)
            if item.filename.endswith("sample_inputs/model.pt"):  # the one pickle in a .pt2
                data = buffer.getvalue()
            target.writestr(item, data)
    with pytest.raises(CheckpointError, match="cannot read teacher program"):
        load_program(tmp_path / "evil.pt2")
    assert not marker.exists()
    assert os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD") is None


def test_missing_and_wrong_program_files(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_program(tmp_path / "none.pt2")
    with pytest.raises(CheckpointError, match="is a directory"):
        load_program(tmp_path)
    (tmp_path / "junk.pt2").write_bytes(b"not a zip")
    with pytest.raises(CheckpointError, match="cannot read teacher program"):
        load_program(tmp_path / "junk.pt2")
