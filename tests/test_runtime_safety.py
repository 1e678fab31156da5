"""Issue 15, the run-time half: options, run directories, signals, non-finite numbers, output
paths and a full disk. Every bad input is one line on stderr, exit code 2 and nothing left
behind; a stop saves a checkpoint and exits 130/143; a resumed stop ends with exactly the
weights of an uninterrupted run."""

from __future__ import annotations

import copy
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from stars_deploy.cli import main
from stars_deploy.cli.common import to_json
from stars_deploy.distillation import distill, make_config
from stars_deploy.errors import CheckpointError, ConfigError, DataError
from stars_deploy.evaluation import accuracy
from stars_deploy.fileio import DiskFullError, save_torch, write_bytes, write_json
from stars_deploy.layout import CHECKPOINT, DISTILL, MANIFEST, STUDENT
from stars_deploy.pipeline import run_pipeline
from stars_deploy.runs import content_digest
from stars_deploy.teachers import TeacherSpec, load_teacher

NO_CUDA = not torch.cuda.is_available()
SMALL = ["--batch-size", "32", "--synthesis-steps", "5", "--kd-steps", "2", "--kd-batch-size", "32", "--no-eval"]


def run_main(capsys, *args) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in args])
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def assert_one_line(code: int, err: str, expected: str, exit_code: int = 2) -> str:
    assert code == exit_code, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("stars-deploy: error: "), err
    assert expected in lines[0], lines[0]
    assert "Traceback" not in err
    return lines[0]


def cli(*args, cwd, **env) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "stars_deploy", *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1", **env})


def one_error_line(err: str) -> str:
    """The last line of stderr (the progress bar's carriage returns come before it)."""
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip()]
    assert lines and lines[-1].startswith("stars-deploy: error: "), err
    assert sum(line.startswith("stars-deploy: error: ") for line in lines) == 1 and "Traceback" not in err, err
    return lines[-1]


# ---- options: finite, in range, checked before any work --------------------------------------
OPTION_CASES = {
    "kd-lr nan": (["--kd-lr", "nan"], "--kd-lr nan is not a finite number"),
    "budget inf": (["--budget-s", "inf"], "--budget-s inf is not a finite number"),
    "tau nan": (["--tau-mem-steps", "nan"], "--tau-mem-steps nan is not a finite number"),
    "normalization nan": (["--normalization", "nan/nan"], "every mean and std must be a finite number"),
    "lr beyond float32": (["--kd-lr", "1e300"], "is beyond float32's range"),
    "T 0": (["-T", "0"], "--timesteps must be at least 1, got 0"),
    "T huge": (["-T", "1000000"], "needs at least 10.0 TiB of memory"),
    "batch huge": (["--batch-size", "10000000"], "synthesis 467.9 GiB"),
    "width huge": (["--width", "1000000"], "parameters 1.3 PiB"),
    "depth huge": (["--depth", "100000"], "--depth 100000: at most 1202 layers"),
    "negative seed": (["--seed", "-1"], "--seed must be in 0.."),
    "name with a slash": (["--name", "a/b"], "--name 'a/b': a run name is one directory name"),
    "name escaping": (["--name", ".."], "--name '..': a run name is one directory name"),
}


@pytest.mark.parametrize("case", list(OPTION_CASES))
def test_bad_distill_options_are_one_line_before_any_work(case, capsys, tmp_path, digits_teacher):
    args, expected = OPTION_CASES[case]
    code, out, err = run_main(capsys, "distill", *args, "--runs-dir", tmp_path / "runs", "--rounds", "1")
    assert_one_line(code, err, expected)
    assert out == "" and not (tmp_path / "runs").exists()


def test_the_memory_estimate_says_what_it_needs_and_what_there_is(capsys, tmp_path):
    code, _, err = run_main(capsys, "distill", "-T", "1000000", "--runs-dir", tmp_path, "--rounds", "1")
    line = assert_one_line(code, err, "this distillation needs at least")
    assert "available on cpu" in line and "lower -T/--timesteps" in line and "KD step" in line


@pytest.mark.skipif(not NO_CUDA, reason="a machine with CUDA accepts --device cuda")
@pytest.mark.parametrize("argv", [["distill", "--rounds", "1"], ["simulate"], ["check", "--min-accuracy", "0.5"],
                                  ["report"], ["teacher", "eval"]])
def test_device_cuda_without_cuda_is_the_same_clean_error_everywhere(argv, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no runs/ here: the device is refused before looking for one
    code, _, err = run_main(capsys, *argv, "--device", "cuda")
    assert_one_line(code, err, "--device cuda: CUDA is not available on this machine; use --device cpu or auto")


@pytest.mark.parametrize("argv, expected", [
    (["simulate", "-T", "0"], "Invalid value for '--timesteps' / '-T': 0 is not in the range x>=1"),
    (["simulate", "-T", "-5"], "-5 is not in the range x>=1"),
    (["teacher", "eval", "--samples", "-1"], "Invalid value for '--samples': -1 is not in the range x>=1"),
    (["check", "--max-latency-steps", "-1"], "-1 is not in the range x>=0"),
    (["check", "--min-agreement", "nan"], "Invalid value for '--min-agreement': 'nan' is not a finite number"),
    (["simulate", "--dt-s", "nan"], "Invalid value for '--dt-s': 'nan' is not a finite number"),
    (["simulate", "--loihi2-pj-per-op", "-1"], "-1.0 is not in the range x>0.0"),
    (["check", "--junit-xml", "../../x.xml", "--min-accuracy", "0.5"],
     "'../../x.xml' is outside the working directory; give an absolute path to write there"),
])
def test_cli_ranges_and_escaping_output_paths_are_usage_errors(argv, expected, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_main(capsys, *argv)
    assert_one_line(code, err, expected)
    assert not (tmp_path.parent.parent / "x.xml").exists()


def test_teacher_train_out_must_be_a_file(capsys, tmp_path):
    code, _, err = run_main(capsys, "teacher", "train", "--out", tmp_path)
    assert_one_line(code, err, f"Invalid value for '--out': File '{tmp_path}' is a directory")


# ---- gate limits out of range, in a config file ------------------------------------------------
@pytest.mark.parametrize("text, expected", [
    ("[check]\nmin-accuracy = 1.5\n", "min-accuracy = 1.5 is outside 0.0..1.0"),
    ("[check]\nmax-accuracy-drop = -2.0\n", "max-accuracy-drop = -2.0 is outside -1.0..1.0"),
    ("[check]\nmax-spikes-per-sample = -1\n", "max-spikes-per-sample = -1 is outside 0.0..inf"),
    ("[check]\nmax-latency-steps = 2.5\n", "max-latency-steps must be an integer, got 2.5"),
    ("[check]\nmin-accuracy = nan\n", "min-accuracy must be a number, got nan"),
    ("[check]\nsamples = 1.5\n", "samples must be a int, got 1.5"),
])
def test_gate_limits_out_of_range_in_a_config_are_usage_errors(text, expected, capsys, tmp_path, digits_run_dir):
    run = digits_run_dir(tmp_path / "runs" / "r")
    (tmp_path / "gates.toml").write_text(text)
    code, _, err = run_main(capsys, "check", run, "--config", tmp_path / "gates.toml", "--target", "nir")
    assert_one_line(code, err, expected)


# ---- pipeline files: integers, finite numbers, paths inside the working directory --------------
@pytest.mark.parametrize("text, match", [
    ("[distill]\nrounds = 1.7\n", r"rounds = 1.7: 1.7 is not a valid integer"),
    ("[distill]\nbatch-size = 64.0\n", r"batch-size = 64.0: 64.0 is not a valid integer"),
    ("[distill]\nkd-lr = nan\n", r"kd-lr = nan: nan is not a finite number"),
    ("[distill]\nbudget-s = inf\n", r"budget-s = inf: inf is not a finite number"),
    ("[distill]\nname = '../../x'\n", r"\[distill\]: name '../../x': a run name is one directory name"),
    ("[distill]\nname = '/tmp/x'\n", r"name '/tmp/x': a run name is one directory name"),
    ("[distill]\nruns-dir = '/tmp'\n", r"runs-dir = '/tmp': a pipeline file may only name a folder inside"),
    ("[distill]\nruns-dir = '../runs'\n", r"runs-dir = '../runs': a pipeline file may only name a folder inside"),
    ("[distill]\nrounds = 1\nbatch-size = 100000000\n", r"needs at least .* of memory"),
])
def test_bad_pipeline_values_are_refused_before_distilling(text, match, tmp_path, monkeypatch, digits_teacher):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "p.toml").write_text(text + "[export]\ntargets = ['nir']\n")
    with pytest.raises(ConfigError, match=match):
        run_pipeline("p.toml", device="cpu")
    assert not (tmp_path / "runs").exists() and not (tmp_path.parent / "x").exists()


# ---- non-finite numbers ------------------------------------------------------------------------
def test_nan_or_inf_teacher_weights_are_refused_naming_the_layer(tmp_path, capsys, digits_teacher):
    state = torch.load(digits_teacher[0], weights_only=True)
    name = next(key for key, value in state.items() if value.is_floating_point())
    for value in (float("nan"), float("inf")):
        broken = dict(state)
        broken[name] = state[name].clone()
        broken[name].view(-1)[3] = value
        torch.save(broken, tmp_path / "broken.pt")
        with pytest.raises(CheckpointError, match=rf"{name} holds 1 NaN or infinite value\(s\)"):
            load_teacher(TeacherSpec(), tmp_path / "broken.pt")
    code, out, err = run_main(capsys, "teacher", "eval", "--weights", tmp_path / "broken.pt", "--json")
    assert_one_line(code, err, f"{name} holds 1 NaN or infinite value(s)")
    assert f"{name} holds 1 NaN" in json.loads(out, parse_constant=lambda c: pytest.fail(f"bare {c}"))["error"]


def test_json_never_emits_nan():
    text = to_json({"accuracy": float("nan"), "rates": [float("inf"), 0.5], "nested": {"drop": float("-inf")}})

    def refuse(constant):
        raise AssertionError(f"bare {constant} in {text}")

    assert json.loads(text, parse_constant=refuse) == {"accuracy": None, "rates": [None, 0.5],
                                                       "nested": {"drop": None}}


def test_accuracy_of_no_images_is_refused_not_nan():
    with pytest.raises(DataError, match="no images to score"):
        accuracy(torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long))
    assert accuracy(torch.tensor([1, 2]), torch.tensor([1, 3])) == 0.5


@pytest.fixture
def overflowing_teacher(tmp_path, digits_teacher):
    """The digits teacher with its first convolution scaled by 1e38: finite weights, but
    activations that overflow float32 on any image."""
    state = torch.load(digits_teacher[0], weights_only=True)
    state["conv1.weight"] = state["conv1.weight"] * 1e38
    torch.save(state, tmp_path / "overflowing.pt")
    return tmp_path / "overflowing.pt"


@pytest.mark.parametrize("case", ["synthesis", "kd"])
def test_a_non_finite_loss_stops_training_naming_the_term_and_leaves_nothing_broken(case, tmp_path,
                                                                                      overflowing_teacher):
    args, expected = {
        "synthesis": (["--weights", overflowing_teacher], "round 1: the synthesis loss term(s) l_bn (weight --l-bn 1)"),
        # 1e-45 is float32's smallest subnormal: logits / tau overflow
        "kd": (["--kd-temperature", "1e-45"], "round 1: the student loss term kd became NaN or infinite"),
    }[case]
    process = cli("distill", *args, "--rounds", "3", "--checkpoint-every", "5", *SMALL, "--runs-dir",
                  tmp_path / "runs", cwd=tmp_path)
    _, err = process.communicate(timeout=600)
    assert process.returncode == 2, err
    line = one_error_line(err)
    assert expected in line and "nothing was saved and the run directory was removed" in line
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_a_non_finite_loss_after_a_checkpoint_keeps_it(tmp_path, capsys, digits_teacher, monkeypatch):
    """Divergence in round 3 of a run that checkpointed round 2: that checkpoint is intact and
    nothing of round 3 reached the pool or the checkpoint."""
    import stars_deploy.distillation.loop as loop

    real_kd_loss, calls = loop.kd_loss, []

    def kd_loss_nan_in_round_3(*args):
        calls.append(1)
        loss = real_kd_loss(*args)
        return loss * float("nan") if 4 < len(calls) <= 6 else loss  # 2 KD steps a round: round 3

    monkeypatch.setattr(loop, "kd_loss", kd_loss_nan_in_round_3)
    code, _, err = run_main(capsys, "distill", "--rounds", "5", "--checkpoint-every", "2", *SMALL, "--name", "run",
                            "--runs-dir", tmp_path / "runs")
    run = tmp_path / "runs" / "run"
    assert code == 2
    line = one_error_line(err)
    assert "round 3: the student loss term kd became NaN or infinite" in line
    assert line.endswith(f"the checkpoint of round 2 in {run} is intact")  # resuming would diverge again
    checkpoint = torch.load(run / CHECKPOINT, weights_only=True)
    assert checkpoint["round"] == 2 and all(torch.isfinite(v).all() for v in checkpoint["student"].values()
                                            if v.is_floating_point())
    assert json.loads((run / MANIFEST).read_text())["status"] == "running" and not (run / STUDENT).exists()


# ---- run directories: manifests, checkpoints, orphans -----------------------------------------
def _edit_manifest(run: Path, edit) -> None:
    manifest = json.loads((run / MANIFEST).read_text())
    edit(manifest)
    (run / MANIFEST).write_text(json.dumps(manifest))


MANIFEST_CASES = {
    "no config": (lambda m: m.pop("config"), "key 'config' is missing"),
    "other format": (lambda m: m.update(format="stars-deploy/run-v9"), "key 'format' is 'stars-deploy/run-v9'"),
    "no format": (lambda m: m.pop("format"), "key 'format' is None"),
    "bad status": (lambda m: m.update(status="done"), "key 'status' is 'done'"),
    "timesteps a string": (lambda m: m["config"]["student"].update(timesteps="4"),
                           "config.student.timesteps = '4' is not an integer"),
    "tau nan": (lambda m: m["config"]["student"]["lif"].update(tau_mem_steps=float("nan")),
                "config.student.lif.tau_mem_steps = nan is not a finite number"),
    "no teacher": (lambda m: m["config"].pop("teacher"), "config.teacher is missing"),
    "unknown key": (lambda m: m["config"].update(warp_drive=True), "config.warp_drive is not a known setting"),
    "out of range": (lambda m: m["config"].update(kd_steps=0), "--kd-steps must be at least 1, got 0"),
    "shape of 2": (lambda m: m["config"]["student"].update(input_shape=[1, 8]), "has 2 entries, expected 3"),
}


@pytest.mark.parametrize("case", list(MANIFEST_CASES))
@pytest.mark.parametrize("command", [["export", "--target", "nir"], ["simulate", "--samples", "5"],
                                     ["check", "--min-accuracy", "0", "--target", "nir"], ["report"]])
def test_a_broken_manifest_is_one_line_naming_the_file_and_key(case, command, capsys, tmp_path, digits_run_dir):
    edit, expected = MANIFEST_CASES[case]
    run = digits_run_dir(tmp_path / "runs" / "r")
    _edit_manifest(run, edit)
    code, _, err = run_main(capsys, *command, run)
    line = assert_one_line(code, err, expected)
    assert str(run / MANIFEST) in line


def test_a_binary_manifest_says_it_is_not_json_text(capsys, tmp_path, digits_run_dir):
    run = digits_run_dir(tmp_path / "runs" / "r")
    (run / MANIFEST).write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(64))
    code, _, err = run_main(capsys, "report", run)
    line = assert_one_line(code, err, "is not JSON text (byte 0 is not UTF-8: a binary file?)")
    assert str(run / MANIFEST) in line


@pytest.fixture(scope="module")
def unfinished_run(tmp_path_factory, digits_teacher):
    """A real run stopped after its checkpoint of round 2: (run directory, its checkpoint)."""
    folder = tmp_path_factory.mktemp("unfinished")
    config = make_config(rounds=2, checkpoint_every=1, kd_steps=2, kd_batch_size=16,
                         synthesis={"batch_size": 16, "steps": 2}, eval_data=None)
    summary = distill(config, runs_dir=folder, run_name="run")
    run = Path(summary["run_dir"])
    (run / DISTILL).unlink()
    (run / STUDENT).unlink()
    _edit_manifest(run, lambda m: m.update(status="running"))
    return run, torch.load(run / CHECKPOINT, weights_only=True)


CHECKPOINT_CASES = {
    "no optimizer": (lambda c: c.pop("optimizer"), "key 'optimizer' is missing"),
    "no rng": (lambda c: c.pop("rng"), "key 'rng' is missing"),
    "other format": (lambda c: c.update(format="x"), "key 'format' is 'x'"),
    "round a float": (lambda c: c.update(round=2.5), "key 'round' is a float, expected int"),
    "negative round": (lambda c: c.update(round=-1), "round -1 / elapsed_s"),
    "elapsed nan": (lambda c: c.update(elapsed_s=float("nan")), "out of range"),
    "short history": (lambda c: c.update(history=c["history"][:1]), "key 'history' must hold one record per round"),
    "bad pool": (lambda c: c.update(pool=[16, -3]), "key 'pool' must list positive chunk sizes"),
    "student of another shape": (lambda c: c["student"].update({k: v[:1] for k, v in c["student"].items()
                                                                if v.dim() > 0}), "mis-shaped keys"),
    "student nan": (lambda c: next(v for v in c["student"].values() if v.is_floating_point()).fill_(float("nan")),
                    "NaN or infinite value"),
    "foreign optimizer": (lambda c: c["optimizer"].update(param_groups=[]), "key 'optimizer' does not fit this run"),
    "rng garbage": (lambda c: c["rng"].update(cpu=torch.zeros(3, dtype=torch.uint8)), "key 'rng' does not fit"),
    "not a dict": (lambda c: c.clear() or c.update(format="stars-deploy/checkpoint-v1"), "key 'round' is missing"),
}
RESEALED = ("student of another shape", "student nan", "foreign optimizer", "rng garbage")  # digest recomputed


@pytest.mark.parametrize("case", list(CHECKPOINT_CASES))
def test_a_broken_checkpoint_is_one_line_and_the_run_is_left_alone(case, unfinished_run, capsys, tmp_path):
    run, checkpoint = unfinished_run
    copy_dir = tmp_path / "run"
    shutil.copytree(run, copy_dir)
    edit, expected = CHECKPOINT_CASES[case]
    broken = copy.deepcopy(checkpoint)
    edit(broken)
    if case in RESEALED:  # consistent but wrong (another configuration's file): the deeper checks answer
        broken["sha256"] = content_digest({key: value for key, value in broken.items() if key != "sha256"})
    torch.save(broken, copy_dir / CHECKPOINT)
    before = sorted(p.name for p in copy_dir.iterdir())
    code, _, err = run_main(capsys, "distill", "--resume", copy_dir)
    line = assert_one_line(code, err, expected)
    assert str(copy_dir / CHECKPOINT) in line
    assert sorted(p.name for p in copy_dir.iterdir()) == before  # a resumed run is never removed


def test_a_flipped_bit_that_still_loads_is_caught_by_the_checkpoint_digest(unfinished_run, capsys, tmp_path):
    run, checkpoint = unfinished_run
    copy_dir = tmp_path / "run"
    shutil.copytree(run, copy_dir)
    flipped = copy.deepcopy(checkpoint)
    weight = next(v for v in flipped["student"].values() if v.is_floating_point())
    weight.view(torch.int32).view(-1)[0] ^= 1 << 20  # one bit of one weight: still a valid float
    torch.save(flipped, copy_dir / CHECKPOINT)
    code, _, err = run_main(capsys, "distill", "--resume", copy_dir)
    assert_one_line(code, err, "its content does not match its sha256 (a bit flipped, or it was edited)")


def test_resume_refuses_a_finished_run_and_a_file(capsys, tmp_path, digits_run_dir):
    run = digits_run_dir(tmp_path / "runs" / "r")
    _edit_manifest(run, lambda m: m.update(status="complete"))
    code, _, err = run_main(capsys, "distill", "--resume", run)
    assert_one_line(code, err, "is a finished run (status complete, distill.json written): --resume only continues")
    code, _, err = run_main(capsys, "distill", "--resume", run / MANIFEST)
    assert_one_line(code, err, "not a directory; give the run directory (the folder that holds manifest.json)")


def test_orphaned_temporary_files_are_removed_when_the_run_is_next_opened(capsys, tmp_path, digits_run_dir):
    run = digits_run_dir(tmp_path / "runs" / "r")
    old, fresh = run / ".checkpoint.pt.k1ll3d.tmp", run / ".student.pt.wr1t1ng.tmp"
    (run / "pool").mkdir()
    old_chunk = run / "pool" / ".chunk_000003.pt.abc.tmp"
    for path in (old, fresh, old_chunk):
        path.write_bytes(b"half a file")
    an_hour_ago = time.time() - 3600
    os.utime(old, (an_hour_ago, an_hour_ago))
    os.utime(old_chunk, (an_hour_ago, an_hour_ago))
    code, _, err = run_main(capsys, "export", "--target", "nir", run)
    assert code == 0, err
    assert not old.exists() and not old_chunk.exists()
    assert fresh.exists()  # it may belong to a writer that is still running
    assert f"removed {old}" in err


# ---- a full disk -------------------------------------------------------------------------------
class FullDisk:
    """A file handle on a disk that fills up after 10 bytes (what ENOSPC looks like to a writer)."""

    def __init__(self, handle):
        self.handle = handle

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.close()

    def write(self, data):
        self.handle.write(data[:10])
        raise OSError(errno.ENOSPC, "No space left on device")

    def flush(self):
        self.handle.flush()

    def fileno(self):
        return self.handle.fileno()


def test_a_full_disk_is_one_line_and_the_previous_file_survives(tmp_path, monkeypatch):
    import stars_deploy.fileio as fileio

    target = tmp_path / "checkpoint.pt"
    save_torch(target, {"round": 1})
    real_fdopen = os.fdopen

    monkeypatch.setattr(fileio.os, "fdopen", lambda fd, mode: FullDisk(real_fdopen(fd, mode)))
    with pytest.raises(DiskFullError) as raised:
        save_torch(target, {"round": 2, "weights": torch.zeros(1000)})
    message = str(raised.value)
    assert f"no space left to write {target}" in message and "needed" in message
    assert f"nothing was lost: {target} keeps its previous version" in message and "\n" not in message
    assert "unexpected pos" not in message
    assert torch.load(target, weights_only=True) == {"round": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]  # no temporary file left


def test_too_little_free_space_is_refused_before_writing(tmp_path, monkeypatch):
    import stars_deploy.fileio as fileio

    monkeypatch.setattr(fileio.shutil, "disk_usage", lambda path: SimpleNamespace(total=100, used=90, free=10))
    with pytest.raises(DiskFullError, match=r"\(2\.0 KiB needed, 10 B free\); nothing was lost: no partial"):
        write_bytes(tmp_path / "big.bin", b"x" * 2048)
    assert not any(tmp_path.iterdir())
    write_json(tmp_path / "small.json", 1)  # 2 bytes fit
    assert (tmp_path / "small.json").read_text() == "1\n"


def test_a_full_disk_mid_run_keeps_the_last_checkpoint_and_says_how_to_resume(tmp_path, monkeypatch, capsys,
                                                                              digits_teacher):
    """The disk fills up during the second checkpoint's write (round 2): the run stops with one
    line, the checkpoint of round 1 is untouched and resumable."""
    import stars_deploy.fileio as fileio

    real_fdopen, checkpoints = os.fdopen, []

    def fdopen(fd, mode):
        handle = real_fdopen(fd, mode)
        if os.path.basename(os.readlink(f"/proc/self/fd/{fd}")).startswith(f".{CHECKPOINT}."):
            checkpoints.append(fd)
            if len(checkpoints) == 2:
                return FullDisk(handle)
        return handle

    monkeypatch.setattr(fileio.os, "fdopen", fdopen)
    code, _, err = run_main(capsys, "distill", "--rounds", "4", "--checkpoint-every", "1", *SMALL, "--name", "run",
                            "--runs-dir", tmp_path / "runs")
    run = tmp_path / "runs" / "run"
    assert code == 2
    line = one_error_line(err)
    assert f"no space left to write {run / CHECKPOINT}" in line
    assert f"nothing was lost: {run / CHECKPOINT} keeps its previous version" in line
    assert line.endswith(f"the checkpoint of round 1 in {run} is intact: resume with "
                         f"`stars-deploy distill --resume {run}`")
    assert torch.load(run / CHECKPOINT, weights_only=True)["round"] == 1
    assert not list(run.glob(".*.tmp"))


# ---- signals -----------------------------------------------------------------------------------
def _checkpoint_round(path: Path) -> int:
    try:
        return torch.load(path, weights_only=True)["round"]
    except Exception:  # not there yet
        return -1


def _wait_for(predicate, process, timeout_s: float = 600) -> None:
    deadline = time.time() + timeout_s
    while not predicate() and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
    assert predicate(), "the run did not get there"


def test_sigint_saves_a_checkpoint_exits_130_and_the_resumed_run_has_the_uninterrupted_weights(tmp_path,
                                                                                               digits_teacher):
    # checkpoint-every 100: without the stop's own checkpoint, everything after round 0 would be lost
    args = ["--rounds", "40", "--checkpoint-every", "100", "--seed", "4", *SMALL, "--name", "run"]
    reference = cli("distill", *args, "--runs-dir", tmp_path / "a", cwd=tmp_path)
    victim = cli("distill", *args, "--runs-dir", tmp_path / "b", cwd=tmp_path)
    run = tmp_path / "b" / "run"
    _wait_for(lambda: (run / MANIFEST).is_file(), victim)  # written just before the first round
    time.sleep(1.0)  # a few rounds in (~0.1-0.7 s each on the machines this ran on)
    victim.send_signal(signal.SIGINT)
    _, err = victim.communicate(timeout=300)
    assert victim.returncode == 130, err
    line = one_error_line(err)
    stopped_at = _checkpoint_round(run / CHECKPOINT)
    assert 0 <= stopped_at < 40, line
    assert f"interrupted by SIGINT: saved {run / CHECKPOINT} at round {stopped_at} ({stopped_at} of 40 rounds" in line
    assert line.endswith(f"continue with `stars-deploy distill --resume {run}`")
    assert json.loads((run / MANIFEST).read_text())["status"] == "interrupted"
    assert not (run / STUDENT).exists()

    (run / ".checkpoint.pt.left.tmp").write_bytes(b"an earlier hard kill")  # resume removes it at once
    resumed = cli("distill", "--resume", run, "--json", cwd=tmp_path)
    out, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err
    assert f"resuming {run} at round {stopped_at}" in err and not (run / ".checkpoint.pt.left.tmp").exists()
    assert json.loads(out)["rounds"] == 40
    _, err = reference.communicate(timeout=600)
    assert reference.returncode == 0, err
    a = torch.load(tmp_path / "a" / "run" / STUDENT, weights_only=True)["state_dict"]
    b = torch.load(run / STUDENT, weights_only=True)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)
    assert json.loads((run / MANIFEST).read_text())["status"] == "complete"

    again = cli("distill", "--resume", run, cwd=tmp_path)  # finished: refused, nothing overwritten
    before = (run / DISTILL).read_bytes()
    _, err = again.communicate(timeout=300)
    assert again.returncode == 2 and "is a finished run" in one_error_line(err)
    assert (run / DISTILL).read_bytes() == before


def test_sigterm_saves_and_exits_143_and_a_second_signal_stops_at_once(tmp_path, digits_teacher):
    slow = ["--rounds", "50", "--checkpoint-every", "1", "--batch-size", "64", "--synthesis-steps", "300",
            "--kd-steps", "2", "--no-eval", "--name", "run"]
    process = cli("distill", *slow, "--runs-dir", tmp_path / "t", cwd=tmp_path)
    run = tmp_path / "t" / "run"
    _wait_for(lambda: _checkpoint_round(run / CHECKPOINT) >= 1, process)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=300)
    assert process.returncode == 143, err
    assert "interrupted by SIGTERM: saved" in one_error_line(err)

    process = cli("distill", *slow, "--runs-dir", tmp_path / "i", cwd=tmp_path)
    run = tmp_path / "i" / "run"
    _wait_for(lambda: _checkpoint_round(run / CHECKPOINT) >= 1, process)
    process.send_signal(signal.SIGINT)
    time.sleep(0.3)  # a round takes seconds here: the second signal lands inside the same round
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=300)
    assert process.returncode == 130, err
    line = one_error_line(err)
    saved = _checkpoint_round(run / CHECKPOINT)
    assert f"stopped by a second SIGINT in round {saved + 1}: the checkpoint of round {saved} in {run} is intact: " \
           f"resume with `stars-deploy distill --resume {run}`" in line


def test_a_stop_while_setting_up_leaves_no_run_directory(tmp_path, monkeypatch, digits_teacher):
    """A real SIGINT that lands after the run directory was made, before the first round: the
    failed start removes it."""
    from stars_deploy.distillation.loop import Distillation
    from stars_deploy.interrupt import Interrupted

    build = Distillation._build_models

    def build_then_get_stopped(self):
        build(self)
        os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(Distillation, "_build_models", build_then_get_stopped)
    config = make_config(rounds=2, kd_steps=1, synthesis={"batch_size": 8, "steps": 1}, eval_data=None)
    with pytest.raises(Interrupted) as raised:
        distill(config, runs_dir=tmp_path / "runs", run_name="run")
    assert raised.value.exit_code == 130
    assert str(raised.value) == "stopped by SIGINT while setting up: nothing was saved and the run directory was removed"
    assert not (tmp_path / "runs" / "run").exists()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handlers are put back
