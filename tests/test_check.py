"""`stars-deploy check`: every gate passes at and just inside its measured value and fails just
outside it; config files are read with clear errors; exit codes 0 / 1 / 2; JSON and JUnit XML."""

import json
import os
import subprocess
import sys
from xml.etree import ElementTree

import pytest

from stars_deploy.distillation import DistillConfig
from stars_deploy.errors import ConfigError
from stars_deploy.exporters.registry import export_run
from stars_deploy.fileio import write_json
from stars_deploy.layout import MANIFEST, STUDENT
from stars_deploy.runs import RUN_FORMAT
from stars_deploy.students import StudentConfig, save_student
from stars_deploy.targets.check import check
from stars_deploy.targets.gates import GATES, load_check_config

SAMPLES = 60


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run with a random-weight convnet student, exported for Loihi and simulated once."""
    import torch

    from stars_deploy.students import build_student

    torch.manual_seed(1)
    config = StudentConfig(family="convnet", width=8, depth=3, timesteps=4)
    student = build_student(config).eval()
    for module in student.modules():
        if isinstance(module, torch.nn.BatchNorm2d):  # lively statistics, so that layers spike
            module.running_var.uniform_(0.2, 0.5)
            module.bias.data.uniform_(0.0, 0.5)
    folder = tmp_path_factory.mktemp("runs") / "r"
    write_json(folder / MANIFEST, {"format": RUN_FORMAT,
                                   "config": DistillConfig(student=config, rounds=1).to_dict()})
    save_student(folder / STUDENT, student)
    export_run(folder, "loihi")
    return folder


@pytest.fixture(scope="module")
def measured(run_dir):
    result = check(run_dir, "loihi", {"min_accuracy": 0.0}, samples=SAMPLES, rerun=True)
    return result["measured"]


def gate_limits(gate, value):
    """(inside, outside): limits just on the passing and just on the failing side of ``value``."""
    step = 1 if gate.kind is int else max(abs(value) * 1e-6, 1e-9)
    inside, outside = (value - step, value + step) if gate.minimum else (value + step, value - step)
    return gate.kind(inside), gate.kind(outside)


@pytest.mark.parametrize("name", list(GATES))
def test_each_gate_passes_at_and_inside_the_measured_value_and_fails_outside(run_dir, measured, name):
    gate = GATES[name]
    value = measured[gate.metric]
    assert value is not None, f"{gate.metric} was not measured"
    inside, outside = gate_limits(gate, value)
    for limit, passes in ((value, True), (inside, True), (outside, False)):
        result = check(run_dir, "loihi", {name: limit}, samples=SAMPLES)
        assert result["reused"], "the stored simulation matches the exported file and should be reused"
        assert result["passed"] is passes, (name, value, limit)
        assert result["gates"][0]["measured"] == value


def test_measured_values_are_plausible(measured):
    assert 0 <= measured["accuracy"] <= 1 and 0 <= measured["agreement"] <= 1
    assert measured["spikes_per_sample"] > 0 and measured["synops_per_sample"] > measured["spikes_per_sample"]
    assert measured["latency_steps"] > 4  # T = 4 plus the pipeline delay
    assert 0.5 < measured["activity_similarity"] <= 1 + 1e-9


def test_a_changed_export_is_simulated_again(run_dir, measured):
    result = check(run_dir, "loihi", {"min_accuracy": 0.0}, samples=SAMPLES)
    assert result["reused"]
    assert not check(run_dir, "loihi", {"min_accuracy": 0.0}, samples=SAMPLES - 1)["reused"]  # other request
    export_run(run_dir, "loihi", dt_s=5e-4)  # the same student lowered with another dt: another file
    assert not check(run_dir, "loihi", {"min_accuracy": 0.0}, samples=SAMPLES - 1)["reused"]
    export_run(run_dir, "loihi")


def test_config_file_limits_per_target_tables_and_option_precedence(run_dir, measured, tmp_path):
    (tmp_path / "stars-deploy.toml").write_text(
        f"[check]\nmin-accuracy = 1.0\nsamples = {SAMPLES}\ntarget = 'loihi'\n"
        f"[check.loihi]\nmax_latency_steps = {measured['latency_steps']}\n")
    result = check(run_dir, config_directory=tmp_path)
    assert [row["gate"] for row in result["gates"]] == ["min-accuracy", "max-latency-steps"]
    assert [row["passed"] for row in result["gates"]] == [False, True]
    assert result["target"] == "loihi" and result["samples"] == SAMPLES
    assert check(run_dir, limits={"min_accuracy": 0.0}, config_directory=tmp_path)["passed"]


def test_pyproject_table_is_found(tmp_path):
    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'x'\n[tool.stars-deploy.check]\nmin-agreement = 0.9\n")
    settings, path = load_check_config(directory=tmp_path)
    assert settings == {"min_agreement": 0.9} and path.name == "pyproject.toml"


@pytest.mark.parametrize("text,match", [
    ("[check]\nmin-acuracy = 0.5\n", r"stars-deploy.toml \[check\]: unknown key 'min-acuracy'"),
    ("[check]\nmin-accuracy = 'high'\n", r"\[check\]: min-accuracy must be a number, got 'high'"),
    ("[check]\nmax-latency-steps = 7.5\n", r"max-latency-steps must be an integer"),
    ("[check]\nsamples = '10'\n", r"samples must be a int"),
    ("[check.loihii]\nmin-accuracy = 0.5\n", r"unknown sub-table \[loihii\]"),
    ("[check.lava]\nmin-accuracy = true\n", r"\[check.lava\]: min-accuracy must be a number"),
    ("[check\nmin-accuracy = 0.5\n", r"stars-deploy.toml is not valid TOML"),
])
def test_bad_config_files_name_the_key_or_file(tmp_path, text, match):
    (tmp_path / "stars-deploy.toml").write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_check_config(directory=tmp_path, target="lava")


def test_missing_config_file_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"check config .*nope.toml does not exist"):
        load_check_config(tmp_path / "nope.toml")


def test_check_without_gates_prints_the_measurements_and_passes(run_dir, measured, tmp_path):
    done = run_cli("--target", "loihi", "--samples", str(SAMPLES), str(run_dir), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "no gates given, measured only" in done.stdout and "no gates given: measuring only" in done.stderr
    accuracy = next(line for line in done.stdout.splitlines() if line.startswith("accuracy "))
    assert f"{100 * measured['accuracy']:.2f} %" in accuracy
    result = check(run_dir, "loihi", {}, samples=SAMPLES, config_directory=tmp_path)
    assert result["gates"] == [] and result["passed"] and result["reused"]
    assert result["measured"]["accuracy"] == measured["accuracy"]


def run_cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "stars_deploy", "check", *args], cwd=cwd, capture_output=True,
                          text=True, env=dict(os.environ), timeout=600)


def test_cli_exit_codes_json_and_junit(run_dir, measured, tmp_path):
    common = ["--target", "loihi", "--samples", str(SAMPLES), str(run_dir)]
    passed = run_cli("--min-accuracy", "0.0", *common, cwd=tmp_path)
    assert passed.returncode == 0, passed.stderr
    assert "min-accuracy" in passed.stdout and "all gates passed" in passed.stdout
    failed = run_cli("--min-accuracy", "1.0", "--max-latency-steps", "1000", "--json", "--junit-xml",
                     str(tmp_path / "gates.xml"), *common, cwd=tmp_path)
    assert failed.returncode == 1, failed.stderr
    payload = json.loads(failed.stdout)
    assert payload["passed"] is False and [g["passed"] for g in payload["gates"]] == [False, True]
    suite = ElementTree.parse(tmp_path / "gates.xml").getroot()
    assert suite.get("tests") == "2" and suite.get("failures") == "1"
    assert [case.get("name") for case in suite if case.find("failure") is not None] == ["min-accuracy"]
    usage = run_cli("--min-accuracy", "x", *common, cwd=tmp_path)
    assert usage.returncode == 2 and "--min-accuracy" in usage.stderr
    (tmp_path / "stars-deploy.toml").write_text("[check]\nbogus = 1\n")
    bad = run_cli(*common, cwd=tmp_path)
    assert bad.returncode == 2 and "unknown key 'bogus'" in bad.stderr and "Traceback" not in bad.stderr
