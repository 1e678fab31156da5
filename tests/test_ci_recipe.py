"""examples/ci-workflow.yml, the CI recipe for a user's repository, run here as far as it can:
a wheel built from this repository, installed into a clean virtual environment the way the
workflow installs it, then the workflow's own commands on a user's teacher that stars-deploy
does not know (a module:factory and a weights file) with gates in stars-deploy.toml.

It builds a venv (minutes), so it runs in CI (``CI`` set) or with STARS_DEPLOY_RECIPE_TEST=1;
the package index is whatever pip is configured with here (the workflow names PyTorch's CPU
index, which this machine cannot reach)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from xml.etree import ElementTree

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
WORKFLOW = (ROOT / "examples" / "ci-workflow.yml").read_text()
ENABLED = bool(os.environ.get("CI") or os.environ.get("STARS_DEPLOY_RECIPE_TEST"))

TEACHER_MODULE = '''
from torch import nn


def make_classifier():
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1, stride=2), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
'''
GATES = '[check]\ntarget = "loihi"\nmin-accuracy = 0.0\nmax-accuracy-drop = 1.0\n[check.loihi]\nmax-latency-steps = 64\n'
# the workflow's commands, with its env values spelled out; each must appear in the workflow verbatim
DISTILL = ('stars-deploy -q distill --teacher "$TEACHER" --weights "$WEIGHTS" --input-shape "$INPUT_SHAPE"\n'
           '          --normalization "$NORMALIZATION" --data "$DATA" --budget-s "$BUDGET_S" --name ci')
STEPS = ["stars-deploy doctor", "stars-deploy export --target nir runs/ci", "stars-deploy export --target loihi runs/ci",
         "stars-deploy check runs/ci --junit-xml gates.xml", "stars-deploy report runs/ci",
         "stars-deploy report runs/ci --format md > summary.md"]


def test_the_commands_tested_here_are_the_workflows():
    for command in (DISTILL, *STEPS):
        assert command in WORKFLOW, f"examples/ci-workflow.yml no longer runs: {command}"
    assert "--index-url https://download.pytorch.org/whl/cpu" in WORKFLOW  # CPU wheels on a hosted runner
    assert "pip install --no-deps norse==1.1.0" in WORKFLOW


def _run(command: list[str] | str, cwd: Path, env: dict, timeout: int = 1200) -> subprocess.CompletedProcess:
    done = subprocess.run(command, cwd=cwd, env=env, shell=isinstance(command, str), capture_output=True,
                          text=True, timeout=timeout)
    assert done.returncode == 0, f"{command} failed ({done.returncode}):\n{done.stderr[-3000:]}"
    return done


@pytest.fixture(scope="module")
def user_repo(tmp_path_factory):
    """A user's repository after the workflow's install step: a clean venv with the wheel."""
    if not ENABLED:
        pytest.skip("builds a virtual environment (minutes): runs in CI, or with STARS_DEPLOY_RECIPE_TEST=1")
    folder = tmp_path_factory.mktemp("user-repo")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTHONPATH"))}
    # built from a copy of the checkout's files, so that no build/ left in the repository (which
    # setuptools never prunes: a deleted module would stay in the wheel) reaches the wheel
    source = folder / "source"
    listed = _run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], ROOT, env).stdout
    for name in filter(None, listed.split("\0")):
        if (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(source),
          "-w", str(folder / "dist")], folder, env)
    wheel = next((folder / "dist").glob("stars_deploy-*.whl"))
    venv = folder / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], folder, env)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    constraints = ["-c", str(ROOT / "constraints.txt")]
    _run([*pip, *constraints, "torch"], folder, env)  # the workflow: torch from the CPU index
    _run([*pip, "--no-deps", "norse==1.1.0"], folder, env)
    _run([*pip, *constraints, str(wheel)], folder, env)
    # the user's own package and files
    (folder / "mymodels.py").write_text(TEACHER_MODULE)
    sys.path.insert(0, str(folder))
    try:
        from mymodels import make_classifier
    finally:
        sys.path.remove(str(folder))
    torch.save(make_classifier().state_dict(), folder / "classifier.pt")
    generator = np.random.default_rng(0)
    np.savez(folder / "test.npz", images=generator.integers(0, 256, (40, 8, 8, 1), dtype=np.uint8),
             labels=generator.integers(0, 10, 40))
    (folder / "stars-deploy.toml").write_text(GATES)
    env.update(PATH=f"{venv / 'bin'}{os.pathsep}{env['PATH']}", PYTHONPATH=str(folder),
               STARS_DEPLOY_CACHE=str(folder / "cache"), TEACHER="mymodels:make_classifier",
               WEIGHTS="classifier.pt", INPUT_SHAPE="1,8,8", NORMALIZATION="0.5/0.25", DATA="test.npz",
               BUDGET_S="15")
    return folder, env


def test_the_workflow_runs_in_a_clean_venv_from_the_wheel(user_repo):
    folder, env = user_repo
    doctor = json.loads(_run("stars-deploy doctor --json", folder, env).stdout)
    assert doctor["healthy"], doctor
    assert {c["name"] for c in doctor["checks"] if c["ok"]} >= {"torch", "norse", "nir", "onnx", "cache"}
    _run(" ".join(DISTILL.split()), folder, env)
    assert json.loads((folder / "runs" / "ci" / "manifest.json").read_text())["status"] == "complete"
    for step in STEPS[1:]:
        _run(step, folder, env)
    cases = ElementTree.parse(folder / "gates.xml").getroot().iter("testcase")
    assert {case.get("name") for case in cases} == {"min-accuracy", "max-accuracy-drop", "max-latency-steps"}
    summary = (folder / "summary.md").read_text()
    assert "| loihi |" in summary and (folder / "runs" / "ci" / "report.html").is_file()
