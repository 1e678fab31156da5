"""A teacher the package does not know, through the command line: a package.module:function
with a weights file, and the same network as a torch.export program."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

TEACHER_MODULE = textwrap.dedent('''
    """A user's own classifier for 3x12x12 images, 4 classes: nothing stars-deploy knows."""
    import torch
    from torch import nn


    class Blocks(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16),
                                      nn.ReLU())
            self.fc = nn.Linear(16, 4)

        def forward(self, x):
            return self.fc(self.body(x).mean((2, 3)))


    def make():
        return Blocks()
''')


def _cli(*args, cwd, path):
    env = {**os.environ, "PYTHONPATH": f"{path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.run([sys.executable, "-m", "stars_deploy", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.fixture(scope="module")
def user_project(tmp_path_factory):
    """A folder with the user's module, trained-looking weights, a .pt2 export and test data."""
    folder = tmp_path_factory.mktemp("user")
    (folder / "mynets.py").write_text(TEACHER_MODULE)
    sys.path.insert(0, str(folder))
    try:
        import mynets
    finally:
        sys.path.remove(str(folder))
    torch.manual_seed(0)
    model = mynets.make().eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 1.5)
    torch.save(model.state_dict(), folder / "weights.pt")
    batch = torch.export.Dim("batch", min=1)
    torch.export.save(torch.export.export(model, (torch.rand(4, 3, 12, 12),), dynamic_shapes=({0: batch},)),
                      str(folder / "mynet.pt2"))
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (40, 12, 12, 3), dtype=np.uint8)
    with torch.no_grad():
        labels = model(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255).argmax(1).numpy()
    np.savez(folder / "data.npz", images=images, labels=labels)
    return folder


@pytest.mark.parametrize("teacher", [["--teacher", "mynets:make", "--weights", "weights.pt", "--input-shape", "3,12,12"],
                                     ["--teacher", "mynet.pt2"]])
def test_distill_export_and_simulate_from_a_teacher_the_package_does_not_know(teacher, user_project, tmp_path):
    common = ["--num-classes", "4", "--normalization", "none"]
    evaluated = _cli("teacher", "eval", *teacher, *common, "--data", "data.npz", "--json", cwd=user_project,
                     path=user_project)
    assert evaluated.returncode == 0, evaluated.stderr
    assert json.loads(evaluated.stdout)["accuracy"] == 1.0  # the labels are its own predictions
    runs = tmp_path / "runs"
    distilled = _cli("distill", *teacher, *common, "--data", "data.npz", "--rounds", "3", "--batch-size", "16",
                     "--synthesis-steps", "4", "--kd-steps", "3", "--width", "8", "--runs-dir", str(runs), "--json",
                     cwd=user_project, path=user_project)
    assert distilled.returncode == 0, distilled.stderr
    summary = json.loads(distilled.stdout)
    assert summary["teacher_accuracy"] == 1.0 and summary["eval_images"] == 40
    run_dir = summary["run_dir"]
    manifest = json.loads((tmp_path / "runs" / os.path.basename(run_dir) / "manifest.json").read_text())
    assert manifest["config"]["teacher"]["arch"] in ("factory", "program")
    assert manifest["config"]["student"]["input_shape"] == [3, 12, 12]
    for command in (["export", "--target", "nir", run_dir], ["simulate", "--target", "nir", run_dir, "--json"]):
        done = _cli(*command, cwd=user_project, path=user_project)
        assert done.returncode == 0, done.stderr
    simulated = json.loads(done.stdout)
    assert simulated["samples"] == 40 and simulated["spike_mismatches"] == 0  # the run's own data by default


@pytest.mark.parametrize("args, message", [
    (["--teacher", "mynets:make"], "needs --input-shape C,H,W"),
    (["--teacher", "mynets:nothing", "--input-shape", "3,12,12"], "mynets has no function nothing"),
    (["--teacher", "nosuchpackage.mod:make", "--input-shape", "3,12,12"], "cannot import nosuchpackage.mod"),
    (["--teacher", "mynets:make", "--input-shape", "3,12"], "give C,H,W"),
    (["--teacher", "mynets:make", "--input-shape", "3,12,12", "--num-classes", "10"], "expected (1, 10)"),
    (["--teacher", "mynet.pt2", "--weights", "weights.pt"], "holds its weights: drop --weights"),
    (["--teacher", "resnet"], "unknown teacher 'resnet'"),
])
def test_bad_teachers_are_one_line(args, message, user_project):
    done = _cli("teacher", "eval", *args, "--data", "data.npz", cwd=user_project, path=user_project)
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and message in done.stderr, done.stderr
