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
from stars_deploy.distillation import DistillConfig, make_config
from stars_deploy.distillation.augment import train_augment
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


@pytest.mark.parametrize("synthesizer", ["pixel", "generator", "twin"])
def test_killed_run_resumes_to_the_same_weights(tmp_path, digits_teacher, synthesizer):
    # the generator host's weights and meta optimiser live in the checkpoint too; the twin
    # strategy is killed in its synthesis phase (rounds 1-6 of 12) and resumes into its KD phase
    # (twin: eager synthesis and float32 KD, so that both runs take one arithmetic path on any CPU;
    # a compiled objective that falls back to eager in one process only, or bf16 autocast on a CPU
    # with AMX, changes the float rounding, not the resume logic this test is about)
    host = ["--strategy", "twin", "--synthesis-fraction", "0.5", "--no-compile-student",
            "--compile-synthesis", "none", "--no-kd-bf16"] \
        if synthesizer == "twin" else ["--synthesizer", synthesizer]
    args = ["--rounds", "12", "--checkpoint-every", "1", "--no-eval", "--seed", "3", *SMALL, *host]
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
    synthesis_rounds = 6 if synthesizer == "twin" else 12  # the twin synthesises in half of its rounds
    assert summary["rounds"] == 12 and summary["synthetic_images"] == synthesis_rounds * 64
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
    from stars_deploy.distillation import distill
    from stars_deploy.teachers.training import CACHE_ENV

    config = make_config(rounds=2, kd_steps=2, synthesis={"batch_size": 16, "steps": 2}, eval_data=None)
    cached = distill(config, runs_dir=tmp_path / "cached")
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "empty-cache"))
    fresh = distill(config, runs_dir=tmp_path / "fresh")
    assert (tmp_path / "empty-cache" / "teachers" / "digits_cnn.pt").is_file()
    a = torch.load(Path(cached["run_dir"]) / "student.pt", weights_only=True)["state_dict"]
    b = torch.load(Path(fresh["run_dir"]) / "student.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(a[key], b[key]) for key in a)



def test_the_twin_strategy_synthesises_first_then_trains_the_twin(tmp_path, digits_teacher):
    from stars_deploy.distillation import distill

    # host: an objective that does not need the student (with rca, the auto objective of a twin
    # run, the synthesis phase trains the twin too: the test after this one)
    config = make_config("host", rounds=8, kd_steps=3, strategy="twin", synthesis_fraction=0.5,
                         compile_student=False, synthesis={"batch_size": 16, "steps": 3}, eval_data="digits",
                         eval_every=4, snapshot_every_s=1e-3)
    summary = distill(config, runs_dir=tmp_path)
    history = json.loads((Path(summary["run_dir"]) / "distill.json").read_text())["history"]
    assert [h["phase"] for h in history] == ["synthesis"] * 4 + ["kd"] * 4
    assert [h["synthetic_images"] for h in history] == [16, 32, 48, 64] + [64] * 4
    assert "kd_loss" not in history[3] and "kd_loss" in history[4]
    assert summary["kd_images"] == 4 * 3 * config.kd_batch_size and summary["strategy"] == "twin"
    assert config.synthesis.init == "smooth" and config.kd_mix == "both"  # the twin's defaults, not given
    snapshots = sorted((Path(summary["run_dir"]) / "snapshots").glob("student-*s.pt"))
    assert len(snapshots) >= 8  # one per round at least: every round takes more than a millisecond
    assert 0 <= summary["student_accuracy"] <= 1


def test_the_spiking_fraction_fine_tunes_the_spiking_student_itself_at_the_end(tmp_path, digits_teacher,
                                                                              monkeypatch):
    from stars_deploy.distillation import distill
    from stars_deploy.distillation.config import SPIKING_STEPS_PER_ROUND
    from stars_deploy.distillation.loop import Distillation
    from stars_deploy.students.rate import RateTwin

    trained, step = [], Distillation._kd_step
    monkeypatch.setattr(Distillation, "_kd_step", lambda self, spiking=None: trained.append(
        (spiking if spiking is not None else self.trainer, self.optimizer.param_groups[0]["lr"])) or step(self, spiking))
    config = make_config("host", rounds=8, kd_steps=3, strategy="twin", synthesis_fraction=0.5,
                         spiking_fraction=0.25, compile_student=False, synthesis={"batch_size": 16, "steps": 3})
    summary = distill(config, runs_dir=tmp_path)
    history = json.loads((Path(summary["run_dir"]) / "distill.json").read_text())["history"]
    assert [h["phase"] for h in history] == ["synthesis"] * 4 + ["kd"] * 2 + ["spiking"] * 2
    twin_steps, spiking_steps = trained[:2 * 3], trained[2 * 3:]
    assert all(isinstance(model, RateTwin) for model, _ in twin_steps)
    assert len(spiking_steps) == 2 * SPIKING_STEPS_PER_ROUND
    assert all(not isinstance(model, RateTwin) and lr == config.spiking_lr for model, lr in spiking_steps)
    assert summary["kd_images"] == (2 * 3 + 2 * SPIKING_STEPS_PER_ROUND) * config.kd_batch_size
    with pytest.raises(ConfigError, match="needs --strategy twin"):
        make_config("host", rounds=2, strategy="direct", spiking_fraction=0.1)
    with pytest.raises(ConfigError, match="spiking-fraction must be in"):
        make_config("host", rounds=2, strategy="twin", synthesis_fraction=0.75, spiking_fraction=0.25)


def test_a_twin_run_whose_objective_needs_the_student_trains_the_twin_while_it_synthesises(
        tmp_path, digits_teacher, monkeypatch):
    from stars_deploy.distillation import distill
    from stars_deploy.distillation.synthesis import PixelSynthesizer
    from stars_deploy.students.rate import RateTwin

    given = []
    synthesize = PixelSynthesizer.synthesize
    monkeypatch.setattr(PixelSynthesizer, "synthesize",
                        lambda self, student, *args: given.append(student) or synthesize(self, student, *args))
    config = make_config(objective="stars", rounds=8, kd_steps=3, strategy="twin", synthesis_fraction=0.5,
                         compile_student=False, synthesis={"batch_size": 16, "steps": 3, "student_every": 1,
                                                           "l_tar_student": 1.0})
    summary = distill(config, runs_dir=tmp_path)
    history = json.loads((Path(summary["run_dir"]) / "distill.json").read_text())["history"]
    assert [h["phase"] for h in history] == ["synthesis"] * 4 + ["kd"] * 4
    assert all("kd_loss" in h and "syn_rca" in h for h in history)  # RCA compared a student that learns
    assert all(0 <= h["syn_tar_student"] < 1 for h in history)  # the student tail, on the twin's currents
    assert summary["kd_images"] == 8 * 3 * config.kd_batch_size
    assert len(given) == 4 and all(isinstance(student, RateTwin) for student in given)  # one pass, not T


@pytest.mark.parametrize("depth", [32, 44, 56])
def test_every_depth_of_the_cifar_family_gets_the_defaults_of_resnet20(depth):
    from dataclasses import replace
    from stars_deploy.teachers import TeacherSpec

    resnet20 = make_config(teacher=TeacherSpec(arch="cifar_resnet20", weights="w.th"), budget_s=1200)
    deeper = make_config(teacher=TeacherSpec(arch=f"cifar_resnet{depth}", weights="w.th"), budget_s=1200)
    assert deeper == replace(resnet20, teacher=deeper.teacher)  # nothing keys on the teacher's name or depth


def test_auto_strategy_depends_on_the_student_and_the_image_size():
    from stars_deploy.teachers import TeacherSpec

    assert make_config().strategy == "direct"  # 8x8 digits
    cifar = TeacherSpec(arch="cifar_resnet20", weights="w.th")
    config = make_config(teacher=cifar, budget_s=60)
    assert config.strategy == "twin" and config.synthesis.steps == 200 and config.synthesis.init == "smooth"
    assert config.kd_steps == 50 and config.channels_last and config.compile_student
    explicit = make_config(teacher=cifar, budget_s=60, kd_steps=7, synthesis={"steps": 20}, channels_last=False)
    assert explicit.kd_steps == 7 and explicit.synthesis.steps == 20 and not explicit.channels_last
    assert make_config(teacher=cifar, budget_s=60, student={"family": "resnet", "depth": 8}).strategy == "direct"
    assert make_config(teacher=cifar, budget_s=60, lif={"tau_syn_steps": 3.0}).strategy == "direct"
    with pytest.raises(ConfigError, match="the resnet student has no rate twin"):
        make_config(teacher=cifar, budget_s=60, student={"family": "resnet", "depth": 8}, strategy="twin")


def test_the_auto_objective_is_rca_on_the_twin_route_and_host_on_the_direct_route():
    from stars_deploy.distillation.config import OBJECTIVES
    from stars_deploy.distillation.options import config_from_options
    from stars_deploy.teachers import TeacherSpec

    cifar = TeacherSpec(arch="cifar_resnet20", weights="w.th")
    twin = make_config(teacher=cifar, budget_s=60)
    assert twin.objective == "rca" and twin.synthesis.l_rca == OBJECTIVES["rca"]["l_rca"] > 0
    assert twin.b_rca == OBJECTIVES["rca"]["b_rca"] and twin.synthesis.needs_student
    direct = make_config()  # digits: the direct route
    assert direct.objective == "host" and direct.synthesis.l_rca == 0 and direct.b_rca == 0
    # the route decides, not the teacher: a CIFAR teacher forced direct gets host, and a given objective wins
    assert make_config(teacher=cifar, budget_s=60, strategy="direct").objective == "host"
    assert make_config("host", teacher=cifar, budget_s=60).objective == "host"
    assert make_config(teacher=cifar, budget_s=60, synthesis={"l_rca": 0.0}).synthesis.l_rca == 0
    assert config_from_options({}).objective == "host"  # the CLI's default is auto too
    assert config_from_options({"arch": "cifar_resnet20", "weights": "w.th"}).objective == "rca"


def test_the_student_tail_needs_current_free_neurons():
    with pytest.raises(ConfigError, match="--l-tar-student compares a current-free LIF"):
        make_config("host", rounds=1, synthesis={"l_tar_student": 1.0}, lif={"tau_syn_steps": 2.0})
    with pytest.raises(ConfigError, match="--l-tar-student must be >= 0"):
        make_config("host", rounds=1, synthesis={"l_tar_student": -1.0})
