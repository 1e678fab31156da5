"""Distillation under torchrun on the CPU: real torch.distributed (gloo), 2 processes.

One short run, from an empty teacher cache (local rank 0 trains the teacher, rank 1 waits):
rank 0 alone writes one complete run directory and prints one JSON object,
the pool holds every rank's batches, and every rank ends with the student rank 0 saved.
torchrun with one process gives the plain command's weights bit for bit. A rank killed
mid-run ends the whole job with a non-zero exit and a one-line reason within a bounded time,
and the group resumes from rank 0's checkpoint (every rank's RNG and generator) to exactly the
weights of an uninterrupted run.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from stars_deploy.distillation.distributed import state_digest

SMALL = ["--batch-size", "32", "--kd-batch-size", "32", "--synthesis-steps", "5", "--kd-steps", "2"]
KILL_DEADLINE_S = 120  # the whole job must be gone this long after one rank is killed


def child_env(tmp_path: Path, **extra: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TMPDIR=str(tmp_path / "tmp"), **extra)
    (tmp_path / "tmp").mkdir(exist_ok=True)
    return env


def torchrun(processes: int, *args, cwd: Path, **env: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes), "--standalone",
               "-m", "stars_deploy", "distill", *args]
    return subprocess.Popen(command, cwd=cwd, env=child_env(cwd, **env), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def plain(*args, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "stars_deploy", "distill", *args], cwd=cwd, env=child_env(cwd),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen, timeout: float = 600) -> tuple[str, str]:
    out, err = process.communicate(timeout=timeout)
    assert process.returncode == 0, err
    return out, err


def student(run_dir: Path) -> dict:
    return torch.load(run_dir / "student.pt", weights_only=True)["state_dict"]


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_two_processes_make_one_run_that_rank_0_writes(tmp_path):
    # an empty teacher cache: local rank 0 trains the teacher while rank 1 waits for it
    runs, cache = tmp_path / "runs", tmp_path / "cache"
    out, err = finish(torchrun(2, "--rounds", "4", "--checkpoint-every", "2", "--eval-every", "2", "--seed", "5",
                               *SMALL, "--runs-dir", str(runs), "--json", cwd=tmp_path, STARS_DEPLOY_CACHE=str(cache)))
    assert err.count("trained digits teacher") == 1 and (cache / "teachers" / "digits_cnn.pt").is_file()
    summary = json.loads(out)  # one JSON object: rank 1 prints nothing
    assert summary["processes"] == 2 and summary["rounds"] == 4
    assert summary["synthetic_images"] == 4 * 2 * 32  # each round: one batch from each rank
    assert summary["kd_images"] == 4 * 2 * 32 * 2  # each step: one minibatch on each rank
    assert 0 <= summary["student_accuracy"] <= 1  # rank 0 evaluated
    (run_dir,) = runs.iterdir()  # one run directory
    assert sorted(p.name for p in run_dir.iterdir()) == \
        ["checkpoint.pt", "distill.json", "manifest.json", "pool", "student.pt"]
    assert sorted(p.name for p in (run_dir / "pool").iterdir()) == [f"chunk_{i:06d}.pt" for i in range(8)]
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["processes"] == 2
    # the ranks synthesised different batches (seed + rank), shared in rank order
    first, second = (torch.load(run_dir / "pool" / f"chunk_{i:06d}.pt", weights_only=True)["images"] for i in (0, 1))
    assert first.shape == second.shape == (32, 1, 8, 8) and not torch.equal(first, second)
    # every rank's final student is the one rank 0 saved
    distilled = json.loads((run_dir / "distill.json").read_text())
    assert distilled["replica_digests"] == [state_digest(student(run_dir))] * 2
    assert [h["round"] for h in distilled["history"] if "student_accuracy" in h] == [2, 4]
    checkpoint = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert checkpoint["world_size"] == 2 and len(checkpoint["other_ranks"]) == 1
    assert not torch.equal(checkpoint["rng"]["cpu"], checkpoint["other_ranks"][0]["rng"]["cpu"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "runs", "tmp"]  # nothing beside the run
    assert not list((tmp_path / "tmp").glob("stars-deploy-pool-*"))  # rank 1's private pool directory is gone


def test_one_process_under_torchrun_is_the_plain_command(tmp_path, digits_teacher):
    args = ["--rounds", "3", "--checkpoint-every", "2", "--no-eval", "--seed", "2", *SMALL, "--name", "run"]
    single = plain(*args, "--runs-dir", str(tmp_path / "plain"), cwd=tmp_path)
    launched = torchrun(1, *args, "--runs-dir", str(tmp_path / "torchrun"), cwd=tmp_path)
    finish(single), finish(launched)
    assert_same_weights(student(tmp_path / "plain" / "run"), student(tmp_path / "torchrun" / "run"))
    losses = [[h["kd_loss"] for h in json.loads((tmp_path / d / "run" / "distill.json").read_text())["history"]]
              for d in ("plain", "torchrun")]
    assert losses[0] == losses[1]


def _checkpoint_round(path: Path) -> int:
    try:
        return torch.load(path, weights_only=True)["round"]
    except Exception:  # not written yet (writes are atomic, so never half a file)
        return -1


def _worker(launcher_pid: int, rank: int) -> int:
    """The pid of torchrun's worker process with RANK=rank (from /proc: its parent and environment)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            environ = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if parent == launcher_pid and f"RANK={rank}".encode() in environ:
            return int(entry.name)
    raise AssertionError(f"no worker with RANK={rank} under torchrun {launcher_pid}")


def test_a_killed_rank_ends_the_job_and_the_group_resumes_exactly(tmp_path, digits_teacher):
    # the generator host: besides its RNG, each rank's generator must come back from the checkpoint
    args = ["--rounds", "30", "--checkpoint-every", "1", "--no-eval", "--seed", "3", *SMALL,
            "--synthesizer", "generator", "--name", "run"]
    reference = torchrun(2, *args, "--runs-dir", str(tmp_path / "a"), cwd=tmp_path)
    victim = torchrun(2, *args, "--runs-dir", str(tmp_path / "b"), cwd=tmp_path)
    run_dir = tmp_path / "b" / "run"
    deadline = time.time() + 600
    while _checkpoint_round(run_dir / "checkpoint.pt") < 3 and time.time() < deadline and victim.poll() is None:
        time.sleep(0.05)
    os.kill(_worker(victim.pid, 1), signal.SIGKILL)
    killed = time.time()
    _, err = victim.communicate(timeout=KILL_DEADLINE_S)
    assert victim.returncode != 0 and time.time() - killed < KILL_DEADLINE_S
    # rank 0 says why it ends (its collective failed, or torchrun stopped it) and how to go on
    assert "stars-deploy: error: rank 0 of 2: " in err and f"Resume with --resume {run_dir}" in err, err
    killed_at = _checkpoint_round(run_dir / "checkpoint.pt")
    assert 3 <= killed_at < 30, "the run was not interrupted mid-way"
    assert not (run_dir / "student.pt").exists()

    refused = plain("--resume", str(run_dir), cwd=tmp_path)  # one process cannot continue two
    _, err = refused.communicate(timeout=300)
    assert refused.returncode == 2 and "distilled by 2 process(es), this job has 1" in err, err

    out, err = finish(torchrun(2, "--resume", str(run_dir), "--json", cwd=tmp_path))
    assert f"resuming {run_dir} at round {killed_at}" in err
    assert json.loads(out)["rounds"] == 30 and json.loads(out)["synthetic_images"] == 30 * 2 * 32
    finish(reference)
    assert_same_weights(student(tmp_path / "a" / "run"), student(run_dir))
    history = json.loads((run_dir / "distill.json").read_text())["history"]
    assert [h["round"] for h in history] == list(range(1, 31))


def test_devices_and_timeout_under_torchrun(monkeypatch):
    from stars_deploy.distillation.distributed import DEFAULT_TIMEOUT_S, TIMEOUT_ENV, _timeout_s, device_name
    from stars_deploy.errors import ConfigError

    assert device_name("cuda:1") == "cuda:1"  # no torchrun: the option as given
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert device_name("cuda") == "cuda:1" and device_name("cpu") == "cpu"
    assert device_name("auto") == ("cuda:1" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ConfigError, match="every process on one GPU"):
        device_name("cuda:0")
    assert _timeout_s() == DEFAULT_TIMEOUT_S
    monkeypatch.setenv(TIMEOUT_ENV, "2.5")
    assert _timeout_s() == 2.5
    monkeypatch.setenv(TIMEOUT_ENV, "soon")
    with pytest.raises(ConfigError, match=TIMEOUT_ENV):
        _timeout_s()


def test_a_stop_that_interrupts_a_write_still_ends_in_the_one_line_error(capsys, monkeypatch):
    """torchrun's SIGTERM can raise PeerError inside torch.save, whose clean-up then raises its
    own RuntimeError: the CLI reports the PeerError, not the interrupted write."""
    from stars_deploy import cli
    from stars_deploy.distillation.distributed import PeerError

    def interrupted_write(*args, **kwargs):
        try:
            raise PeerError("rank 0 of 2: stopped by torchrun; the job ends.")
        except PeerError:
            raise RuntimeError("[enforce fail at inline_container.cc] unexpected pos")

    monkeypatch.setattr(cli.cli, "main", interrupted_write)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["distill"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == "stars-deploy: error: rank 0 of 2: stopped by torchrun; the job ends."
