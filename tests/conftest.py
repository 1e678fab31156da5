"""Shared fixtures. The package's tests never import each other as a `tests` package (lava's
wheels install a top-level `tests` package into site-packages)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from stars_deploy.teachers.training import CACHE_ENV, train_digits_teacher

THIRDPARTY = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "thirdparty"
IN_CI = os.environ.get("CI", "").lower() == "true"


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("stars-deploy-cache")


@pytest.fixture(scope="session")
def digits_teacher(cache_dir):
    """The digits teacher trained once per session into a private cache (about 8 s)."""
    path = cache_dir / "teachers" / "digits_cnn.pt"
    summary = train_digits_teacher(path, epochs=40, seed=0)
    return path, summary


@pytest.fixture(autouse=True)
def private_cache(cache_dir, monkeypatch):
    """Every test sees the session's private teacher cache, never the user's."""
    monkeypatch.setenv(CACHE_ENV, str(cache_dir))


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)


def randomize_batchnorm(model: torch.nn.Module, generator_seed: int = 0) -> torch.nn.Module:
    """Random running statistics and affine terms, so that BatchNorm folding is exercised."""
    generator = torch.Generator().manual_seed(generator_seed)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            shape = module.running_mean.shape
            module.running_mean.copy_(torch.rand(shape, generator=generator) - 0.5)
            module.running_var.copy_(0.5 + 1.5 * torch.rand(shape, generator=generator))
            module.weight.data.copy_(0.5 + torch.rand(shape, generator=generator))
            module.bias.data.copy_(0.7 * torch.rand(shape, generator=generator) - 0.2)
    return model.eval()


@pytest.fixture
def random_student():
    """factory(family, tau_syn_steps=None, timesteps=6) -> an eval-mode student with random
    weights and random BatchNorm statistics (width 8, depth 3 / 8)."""
    from stars_deploy.students.neurons import LIFConfig
    from stars_deploy.students import StudentConfig, build_student

    def make(family: str = "convnet", tau_syn_steps: float | None = None, timesteps: int = 6):
        config = StudentConfig(family=family, width=8, depth=3 if family == "convnet" else 8,
                               timesteps=timesteps, lif=LIFConfig(tau_syn_steps=tau_syn_steps))
        return randomize_batchnorm(build_student(config))
    return make


@pytest.fixture
def randomize_bn():
    """The function randomize_batchnorm (tests never import each other)."""
    return randomize_batchnorm


@pytest.fixture
def digits_run_dir(random_student):
    """factory(folder, family="convnet") -> a finished-looking run directory for the digits
    teacher: a manifest and a random-weight student with random BatchNorm statistics."""
    from stars_deploy.distillation import DistillConfig
    from stars_deploy.fileio import write_json
    from stars_deploy.layout import MANIFEST, STUDENT
    from stars_deploy.runs import RUN_FORMAT
    from stars_deploy.students import save_student

    def make(folder, family: str = "convnet"):
        student = random_student(family, timesteps=4)
        folder.mkdir(parents=True, exist_ok=True)
        config = DistillConfig(student=student.config, rounds=1)
        write_json(folder / MANIFEST, {"format": RUN_FORMAT, "config": config.to_dict()})
        save_student(folder / STUDENT, student)
        return folder
    return make


@pytest.fixture
def thirdparty():
    """find(relative path) -> the public file in ../shared/data/thirdparty, or a skip (a failure
    in CI, which has ../shared)."""
    def find(relative: str) -> Path:
        path = THIRDPARTY / relative
        if not path.is_file():
            message = f"{path} is missing (the shared third-party folder ../shared/data/thirdparty)"
            if IN_CI:
                pytest.fail(message)
            pytest.skip(message)
        return path
    return find


@pytest.fixture
def cli_main(capsys):
    """run(*args) -> (exit code, stdout, stderr) of the CLI in this process."""
    from stars_deploy.cli import main

    def run(*args) -> tuple[int, str, str]:
        with pytest.raises(SystemExit) as exit_info:
            main([str(a) for a in args])
        captured = capsys.readouterr()
        return exit_info.value.code, captured.out, captured.err
    return run
