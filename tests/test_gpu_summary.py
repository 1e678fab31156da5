"""benchmarks/gpu_summary.py: the summary from fake run files (finished, timed out, missing),
the archive, and the check that refuses an $OUT folder the device would not hand back whole."""

from __future__ import annotations

import importlib.util
import json
import os
import tarfile
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_summary.py"


@pytest.fixture(scope="module")
def gs():
    spec = importlib.util.spec_from_file_location("gpu_summary", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fake_results(folder: Path) -> Path:
    folder.mkdir()
    (folder / "run.env").write_text("TOTAL_S=530\nSTART_EPOCH=1700000000\nDEVICE=cuda\nBUDGET_S=190\n")
    (folder / "device.txt").write_text("python 3.12 torch 2.11 cuda True NVIDIA H200\n")
    (folder / "stages.tsv").write_text(
        "setup\t60\t4\t0\nspeed_convnet\t100\t100\t124\nspeed_compiled\t110\t0\tskipped\n"
        "cifar10-convnet-pixel-host\t290\t250\t0\ncifar10-resnet-pixel-stars\t290\t290\t124\n"
        "cuda_checks\t240\t80\t1\n")
    (folder / "speed_convnet.md").write_text("| variant | batch |\n|---|---|\n| host | 256 |\n")
    (folder / "speed_convnet.err").write_text("")
    (folder / "candidates.tsv").write_text("convnet-pixel-host\t--student convnet\nresnet-pixel-stars\t--student resnet\n"
                                           "convnet-never-started\t--x\n")
    (folder / "cifar10-convnet-pixel-host.json").write_text(json.dumps(
        {"student_accuracy": 0.4512, "teacher_accuracy": 0.81, "agreement": 0.47, "synthetic_images": 25600,
         "rounds": 100, "kd_steps": 50, "kd_batch_size": 256, "wall_time_s": 251.3,
         "also_eval": {"student_accuracy": 0.5}}))
    (folder / "cifar10-convnet-pixel-host.err").write_text("")
    (folder / "cifar10-resnet-pixel-stars.json").write_text("")  # killed: nothing on stdout
    (folder / "cifar10-resnet-pixel-stars.err").write_text(
        "distill:  40%|####      | 80/200 [01:00<01:30]\nTraceback (most recent call last):\n"
        "torch.OutOfMemoryError: CUDA out of memory | tried to allocate 2 GiB\n")
    (folder / "cuda_checks.md").write_text("| check | compared | result |\n|---|---|---|\n| loihi | cuda vs cpu | FAIL |\n"
                                           "\n9 checks on cuda: 1 failed (loihi)\n")
    (folder / "cuda_checks.err").write_text("AssertionError: spikes differ\n")
    (folder / "torchrun.err").write_text("half written")  # begun, never recorded
    return folder


def test_summary_has_one_line_per_run_with_the_results_and_the_error_tail_of_a_failed_run(gs, tmp_path):
    text = gs.summary(fake_results(tmp_path / "results"))
    ok = next(line for line in text.splitlines() if line.startswith("| convnet-pixel-host |"))
    assert "45.1 %" in ok and "81.0 %" in ok and "47.0 %" in ok and "25,600" in ok
    assert "1,280,000" in ok and "| 251 |" in ok  # KD images = rounds x kd_steps x kd_batch_size
    killed = next(line for line in text.splitlines() if line.startswith("| resnet-pixel-stars |"))
    assert "timeout" in killed and "CUDA out of memory / tried to allocate" in killed and "40%|" not in killed
    assert "| convnet-never-started |" in text and "no record" in text
    assert "| speed_convnet | 100 | 100 | timeout |" in text and "skipped: no time left" in text
    assert "(timeout; 1 rows measured)" in text
    assert "9 checks on cuda: 1 failed" in text and "stderr: AssertionError: spikes differ" in text
    assert "| torchrun | ? | ? | no record" in text
    assert "--budget-s 190" in text and "Time budget: 530 s" in text


def test_summary_of_an_empty_folder_still_says_what_is_missing(gs, tmp_path):
    (tmp_path / "empty").mkdir()
    text = gs.summary(tmp_path / "empty")
    assert "no device.txt" in text and "CIFAR-10 candidates" in text


def test_pack_writes_two_files_that_pass_the_check_and_cuts_what_is_too_long(gs, tmp_path, monkeypatch):
    results = fake_results(tmp_path / "results")
    (results / "big.err").write_bytes(b"x" * 10_000 + b"THE END")
    monkeypatch.setattr(gs, "MEMBER_BYTES_MAX", 4000)
    monkeypatch.setattr(gs, "SUMMARY_LIMIT", 600)
    out = tmp_path / "out"
    gs.pack(results, out)
    assert sorted(p.name for p in out.iterdir()) == ["results.tar.gz", "summary.md"]
    assert gs.check_out(out) == []
    summary = (out / "summary.md").read_text()
    assert len(summary) <= 600 and "summary_full.md in results.tar.gz" in summary
    with tarfile.open(out / "results.tar.gz") as archive:
        names = archive.getnames()
        big = archive.extractfile("results/big.err").read()
        full = archive.extractfile("results/summary_full.md").read().decode()
    assert "results/cifar10-convnet-pixel-host.json" in names
    assert len(big) < 4100 and big.endswith(b"THE END") and b"bytes cut" in big
    assert "| resnet-pixel-stars |" in full


def test_check_out_refuses_what_the_device_would_not_hand_back(gs, tmp_path):
    out = tmp_path / "out"
    gs.pack(fake_results(tmp_path / "results"), out)
    for index in range(7):
        (out / f"extra{index}.txt").write_text("x")
    problems = gs.check_out(out)
    assert len(problems) == 1 and "9 files, more than 8" in problems[0]
    for index in range(7):
        (out / f"extra{index}.txt").unlink()
    (out / "a" / "b" / "c").mkdir(parents=True)
    (out / "odd name.txt").write_text("x")
    os.symlink(out / "summary.md", out / "link.md")
    (out / "summary.md").write_text("y" * 10_001)
    problems = "\n".join(gs.check_out(out))
    assert "a/b/c" in problems and "more than 2 deep" in problems
    assert "'odd name.txt'" in problems and "'link.md': a link" in problems
    assert "10,001 characters" in problems


def test_check_out_command_fails_loudly(gs, tmp_path, capsys, monkeypatch):
    (tmp_path / "out").mkdir()
    monkeypatch.setattr("sys.argv", ["gpu_summary.py", "--check-out", str(tmp_path / "out")])
    with pytest.raises(SystemExit) as exit_info:
        gs.main()
    assert exit_info.value.code == 1
    printed = capsys.readouterr().out
    assert "OUT CHECK FAILED" in printed and "no summary.md" in printed and "no results.tar.gz" in printed


def test_link_checkout_makes_the_mapped_packages_importable_without_an_install(tmp_path):
    """benchmarks/link_checkout.py: with only its folder on the path (no site-packages, so no
    editable install), stars_deploy.targets is the checkout's targets/ folder."""
    import subprocess
    import sys

    root = SCRIPT.parent.parent
    subprocess.run([sys.executable, str(root / "benchmarks" / "link_checkout.py"), str(tmp_path / "pkg")], check=True)
    probe = ("import importlib.util, stars_deploy.targets, stars_deploy.exporters; "
             "print(importlib.util.find_spec('stars_deploy.targets.loihi').origin); "
             "print(importlib.util.find_spec('stars_deploy.exporters.nir_export').origin)")
    # from the checkout's root, as gpu_check.sh runs: PYTHONSAFEPATH keeps its stars_deploy/ off the path
    done = subprocess.run([sys.executable, "-S", "-c", probe], capture_output=True, text=True, check=True,
                          env={"PYTHONPATH": str(tmp_path / "pkg"), "PYTHONSAFEPATH": "1"}, cwd=root)
    loihi, nir_export = (Path(line).resolve() for line in done.stdout.split())
    assert loihi == root / "targets" / "loihi.py" and nir_export == root / "exporters" / "nir_export.py"
