"""End to end on digits: distillation beats chance by far, --json is one object, and a
killed run resumes to exactly the weights of an uninterrupted one."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from stars_deploy import vocabulary
from stars_deploy.distill import DistillConfig, make_config
from stars_deploy.distill.augment import train_augment
from stars_deploy.errors import ConfigError
from stars_deploy.teachers import TeacherSpec

SMALL = ["--batch-size", "64", "--synthesis-steps", "20", "--kd-steps", "4", "--kd-batch-size", "64"]


def cli(*args, cwd):
    return subprocess.Popen([sys.executable, "-m", "stars_deploy", "distill", *args], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ))


def test_short_distill_beats_chance_by_far_and_prints_one_json_object(tmp_path, digits_teacher):
    process = cli("--rounds", "20", "--objective", "stars", "--eval-every", "5", "--json", "--runs-dir",
                  str(tmp_path), cwd=tmp_path)
    stdout, stderr = process.communicate(timeout=900)
    assert process.returncode == 0, stderr
    summary = json.loads(stdout)  # exactly one JSON object, nothing else on stdout
    assert summary["teacher_accuracy"] > 0.95
    assert summary["student_accuracy"] > 0.6, summary  # chance is 0.1
    assert summary["agreement"] > 0.6
    assert summary["synthetic_images"] == 20 * 128 and summary["rounds"] == 20
    assert 0 < summary["wall_time_s"] and 0 <= summary["agreement"] <= 1
    run_dir = tmp_path / os.path.basename(summary["run_dir"])
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["dt_s"] == 1e-3 and manifest["reset"] == vocabulary.RESET
    history = json.loads((run_dir / "distill.json").read_text())["history"]
    assert [h["round"] for h in history] == list(range(1, 21))
    assert [h["round"] for h in history if "student_accuracy" in h] == [5, 10, 15, 20]
    payload = torch.load(run_dir / "student.pt", weights_only=True)
    assert payload["config"]["family"] == "convnet"


def _checkpoint_round(path):
    try:
        return torch.load(path, weights_only=True)["round"]
    except Exception:  # not written yet (writes are atomic, so never half a file)
        return -1


@pytest.mark.parametrize("synthesizer", ["pixel", "generator"])
def test_killed_run_resumes_to_the_same_weights(tmp_path, digits_teacher, synthesizer):
    # the generator host's weights and meta optimiser live in the checkpoint too
    args = ["--rounds", "12", "--checkpoint-every", "1", "--no-eval", "--seed", "3", *SMALL,
            "--synthesizer", synthesizer]
    reference = cli(*args, "--runs-dir", str(tmp_path / "a"), "--name", "run", cwd=tmp_path)
    victim = cli(*args, "--runs-dir", str(tmp_path / "b"), "--name", "run", cwd=tmp_path)
    checkpoint = tmp_path / "b" / "run" / "checkpoint.pt"
    deadline = time.time() + 600
    while _checkpoint_round(checkpoint) < 4 and time.time() < deadline and victim.poll() is None:
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    killed_at = _checkpoint_round(checkpoint)
    assert 4 <= killed_at < 12, "the run was not interrupted mid-way"
    assert not (tmp_path / "b" / "run" / "student.pt").exists()
    resumed = cli("--resume", str(tmp_path / "b" / "run"), "--json", cwd=tmp_path)
    out, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err
    assert f"resuming {tmp_path / 'b' / 'run'} at round {killed_at}" in err
    _, err = reference.communicate(timeout=600)
    assert reference.returncode == 0, err
    a = torch.load(tmp_path / "a" / "run" / "student.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "b" / "run" / "student.pt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    summary = json.loads(out)
    assert summary["rounds"] == 12 and summary["synthetic_images"] == 12 * 64
    history = json.loads((tmp_path / "b" / "run" / "distill.json").read_text())["history"]
    assert [h["round"] for h in history] == list(range(1, 13))


def test_resume_without_a_checkpoint_is_refused(tmp_path):
    process = cli("--resume", str(tmp_path), cwd=tmp_path)
    _, err = process.communicate(timeout=300)
    assert process.returncode == 2 and "manifest.json does not exist" in err


def test_objective_shorthands_and_overrides():
    assert make_config("host").synthesis.l_rca == 0 and make_config("host").b_rca == 0
    stars = make_config("stars")
    assert stars.synthesis.l_rca > 0 and stars.synthesis.l_tar > 0 and stars.b_rca > 0
    custom = make_config("stars", synthesis={"l_tar": 0.0}, b_rca=0.0)
    assert custom.synthesis.l_tar == 0 and custom.b_rca == 0 and custom.synthesis.l_rca > 0
    assert make_config("host", host="adi").synthesis.l_adv > 0
    with pytest.raises(ConfigError, match="--objective 'best'"):
        make_config("best")
    assert make_config("host").eval_data == "digits"
    assert make_config("host", eval_data=None).eval_data is None
    cifar = TeacherSpec(arch="cifar_resnet20", weights="t.th")
    assert make_config("host", teacher=cifar).eval_data is None  # no digits for a CIFAR teacher
    config = make_config("tar", student={"family": "resnet", "depth": 8, "width": 4})
    assert DistillConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_train_augment_crops_within_the_padding_and_keeps_shapes():
    images = torch.arange(64.0).view(1, 1, 8, 8).repeat(50, 1, 1, 1)
    out = train_augment(images, torch.tensor(-100.0).view(1, 1, 1), flip=False)
    assert out.shape == images.shape
    # each sample is the original shifted by at most 1 px, with black (-100) in the border
    for sample in out:
        inside = sample[sample != -100]
        assert len(inside) >= 49
    assert not torch.equal(out[0], out[1]) or not torch.equal(out[1], out[2])


def test_a_run_from_an_empty_teacher_cache_draws_what_a_cached_run_draws(tmp_path, digits_teacher, monkeypatch):
    """Training the digits teacher seeds torch itself: the run's own seed must come after it."""
    from stars_deploy.distill import distill
    from stars_deploy.teachers.training import CACHE_ENV

    config = make_config(rounds=2, kd_steps=2, synthesis={"batch_size": 16, "steps": 2}, eval_data=None)
    cached = distill(config, runs_dir=tmp_path / "cached")
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "empty-cache"))
    fresh = distill(config, runs_dir=tmp_path / "fresh")
    assert (tmp_path / "empty-cache" / "teachers" / "digits_cnn.pt").is_file()
    a = torch.load(Path(cached["run_dir"]) / "student.pt", weights_only=True)["state_dict"]
    b = torch.load(Path(fresh["run_dir"]) / "student.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(a[key], b[key]) for key in a)
