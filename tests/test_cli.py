"""Bad inputs give a one-line error naming the problem, exit code 2 and no traceback."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from stars_deploy.teachers import TeacherSpec, build_teacher


def run_cli(*args, cwd, env_extra=None):
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "stars_deploy", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad")
    torch.save(build_teacher(TeacherSpec(arch="cifar_resnet32")).state_dict(), folder / "resnet32.pt")
    torch.save(build_teacher(TeacherSpec(arch="cifar_resnet20")).state_dict(), folder / "resnet20.pt")
    data = (folder / "resnet20.pt").read_bytes()
    (folder / "truncated.pt").write_bytes(data[: len(data) // 3])
    np.savez(folder / "cifar.npz", images=np.zeros((4, 32, 32, 3), np.uint8), labels=np.zeros(4, np.int64))
    return folder


CASES = {
    "missing file": (["--teacher", "cifar_resnet20", "--weights", "{d}/nothing.th"], "nothing.th does not exist"),
    "other architecture": (["--teacher", "cifar_resnet20", "--weights", "{d}/resnet32.pt"],
                           "resnet32.pt does not fit CifarResNet: missing keys: none; unexpected keys: layer1.3"),
    "truncated": (["--teacher", "cifar_resnet20", "--weights", "{d}/truncated.pt"], "truncated.pt: the file is truncated"),
    "unknown student": (["--student", "transformer"], "'transformer' is not one of 'convnet', 'resnet'"),
    "negative budget": (["--budget-s", "-5"], "--budget-s must be a positive number of seconds, got -5.0"),
    "eval data size": (["--eval-data", "{d}/cifar.npz"], "cifar.npz has images of shape (3, 32, 32)"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_gives_one_line_error(case, bad_files, tmp_path, digits_teacher):
    args, expected = CASES[case]
    result = run_cli("distill", *[a.format(d=bad_files) for a in args], "--runs-dir", str(tmp_path / "runs"),
                     cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("stars-deploy: error: ")
    assert expected in lines[0]
    assert "Traceback" not in result.stderr and result.stdout == ""
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_teacher_eval_json(tmp_path, digits_teacher):
    result = run_cli("teacher", "eval", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    payload = json.loads(result.stdout)
    assert payload["images"] == 450 and payload["accuracy"] == pytest.approx(digits_teacher[1]["test_accuracy"])


def test_a_malicious_cifar_folder_runs_no_code_through_the_cli(tmp_path, digits_teacher):
    """`teacher eval --data FOLDER` on a crafted test_batch: one line, exit 2, nothing executed."""
    import pickle

    class RunsCode:
        def __reduce__(self):
            return os.system, (f"touch {tmp_path / 'pwned'}",)

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    with open(folder / "test_batch", "wb") as handle:
        pickle.dump({b"labels": [0], b"data": RunsCode()}, handle)
    result = run_cli("teacher", "eval", "--data", str(folder), cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().count("\n") == 0 and "refusing global posix.system" in result.stderr
    assert not (tmp_path / "pwned").exists()
