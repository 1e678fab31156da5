"""The Python API (stars_deploy.api): the commands as functions, a teacher passed as a module."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from stars_deploy import api
from stars_deploy.errors import ConfigError
from stars_deploy.students import SpikingConvNet


class Tiny(nn.Module):
    """A teacher defined in the test: 1x8x8 inputs, 10 classes."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        return self.fc(self.body(x).mean((2, 3)))


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory, digits_teacher):
    summary = api.distill(rounds=4, batch_size=32, synthesis_steps=5, kd_steps=4, data="digits",
                          runs_dir=tmp_path_factory.mktemp("runs"), name="api")
    return summary


def test_the_commands_as_functions(digits_run):
    run_dir = digits_run["run_dir"]
    assert digits_run["rounds"] == 4 and digits_run["eval_images"] == 450
    record = api.export(run_dir, "loihi")
    assert "student.net" in record["files"] and "student.nir" in record["files"]
    summary = api.simulate(run_dir, "loihi", samples=50)
    assert summary["samples"] == 50 and summary["reference"] == "student"
    result = api.check(run_dir, "loihi", min_accuracy=0.0, samples=50)
    assert result["passed"] and result["reused"]  # the simulation just made, same file and request
    assert not api.check(run_dir, "loihi", min_accuracy=1.0, samples=50)["passed"]
    assert api.report(run_dir, format="md")["markdown"].startswith("### stars-deploy: api")


def test_load_student_and_teacher_give_modules_to_use_in_a_notebook(digits_run):
    run_dir = digits_run["run_dir"]
    student = api.load_student(run_dir)
    assert isinstance(student, SpikingConvNet) and not student.training
    images = torch.rand(3, 1, 8, 8)
    out = student(images)
    assert out.logits.shape == (3, 10) and out.logits_t.shape == (4, 3, 10)
    folded = api.load_student(run_dir, folded=True)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    teacher = api.load_teacher(run_dir)
    assert teacher(images).shape == (3, 10) and not any(p.requires_grad for p in teacher.parameters())


def test_distill_from_a_module_the_package_does_not_know(tmp_path, digits_teacher):
    torch.manual_seed(0)
    teacher = Tiny().eval()
    summary = api.distill(teacher, input_shape=(1, 8, 8), normalization="digits", rounds=2, batch_size=16,
                          synthesis_steps=3, kd_steps=2, data="digits", runs_dir=tmp_path)
    assert summary["rounds"] == 2 and 0 <= summary["agreement"] <= 1
    config = api.load_teacher(summary["run_dir"])  # the same process: the module is still held
    assert torch.equal(config(torch.zeros(2, 1, 8, 8)), teacher(torch.zeros(2, 1, 8, 8)))


def test_api_errors_name_the_argument():
    with pytest.raises(ConfigError, match="unknown option 'budget'"):
        api.distill(budget=5)
    with pytest.raises(ConfigError, match=r"rounds = 1.5: 1.5 is not a valid integer"):
        api.distill(rounds=1.5)
    with pytest.raises(ConfigError, match=r"give input_shape=\(C, H, W\)"):
        api.distill(Tiny())
    with pytest.raises(ConfigError, match="unknown gate 'min_acc'"):
        api.check(".", min_acc=0.5)
