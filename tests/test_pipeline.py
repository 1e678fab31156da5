"""`stars-deploy pipeline`, `check` and `report` end to end on a short digits run, the report
opened in a real headless browser (Debian's chromium via chromedriver), and pipeline files
with mistakes refused before anything runs."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from stars_deploy.errors import ConfigError
from stars_deploy.pipeline import run_pipeline

PIPELINE = """
[distill]
rounds = 6
batch-size = 64
kd-batch-size = 64
eval-every = 3
name = "ci"
[export]
targets = ["nir", "loihi"]
[check]
targets = ["loihi", "nir"]
min-accuracy = 0.0
max-accuracy-drop = 0.05
[check.loihi]
max-latency-steps = 1000
"""


def stars_deploy(*args, cwd):
    return subprocess.run([sys.executable, "-m", "stars_deploy", *args], cwd=cwd, capture_output=True, text=True,
                          env=dict(os.environ), timeout=900)


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory, digits_teacher):
    folder = tmp_path_factory.mktemp("pipeline")
    (folder / "ci.toml").write_text(PIPELINE)
    process = stars_deploy("pipeline", "ci.toml", "--json", "--quiet", cwd=folder)
    assert process.returncode == 0, process.stderr
    return folder, json.loads(process.stdout)


def test_pipeline_runs_every_stage(pipeline_run):
    folder, result = pipeline_run
    run_dir = folder / "runs" / "ci"
    assert result["passed"] and result["run_dir"] == "runs/ci"
    assert set(result["checks"]) == {"loihi", "nir"} and all(c["passed"] for c in result["checks"].values())
    for name in ("student.pt", "export/student.nir", "export/student.net", "report.html"):
        assert (run_dir / name).is_file(), name
    for target in ("loihi", "nir"):  # one stored result per request
        assert [p.name for p in run_dir.glob(f"simulate-{target}-*.json")] == \
            [Path(result["checks"][target]["result_file"]).name]
    loihi = result["checks"]["loihi"]
    assert [g["gate"] for g in loihi["gates"]] == ["min-accuracy", "max-accuracy-drop", "max-latency-steps"]
    assert result["distill"]["rounds"] == 6


def test_check_on_the_run_exits_0_then_1(pipeline_run):
    folder, _ = pipeline_run
    passing = stars_deploy("check", "--target", "loihi", "--min-accuracy", "0.0", cwd=folder)
    assert passing.returncode == 0, passing.stderr
    accuracy = json.loads(next((folder / "runs" / "ci").glob("simulate-loihi-*.json")).read_text())["accuracy"]
    assert accuracy < 1.0
    failing = stars_deploy("check", "--target", "loihi", "--min-accuracy", "1.0", cwd=folder)
    assert failing.returncode == 1 and "FAIL" in failing.stdout


def test_a_failing_gate_fails_the_pipeline(tmp_path, digits_teacher):
    (tmp_path / "p.toml").write_text("[distill]\nrounds = 1\nbatch-size = 32\nno-eval = true\n"
                                     "[export]\ntargets = ['nir']\n[check]\ntarget = 'nir'\nmin-accuracy = 1.0\n"
                                     "samples = 20\n[report]\nenabled = false\n")
    process = stars_deploy("pipeline", "p.toml", "--quiet", cwd=tmp_path)
    assert process.returncode == 1, process.stderr
    assert "GATE FAILED" in process.stdout
    assert not list(tmp_path.glob("runs/*/report.html"))


def _browser():
    """Selenium driving Debian's chromium headless; CI installs both (make browser)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    assert chromium and driver, "Debian's chromium and chromium-driver are needed: run `make browser`"
    options = Options()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(argument)
    return webdriver.Chrome(service=Service(driver), options=options)


def test_report_page_loads_every_image_in_a_real_browser(pipeline_run):
    folder, _ = pipeline_run
    page = folder / "runs" / "ci" / "report.html"
    browser = _browser()
    try:
        browser.get(page.resolve().as_uri())
        images = browser.execute_script(
            "return Array.from(document.images).map(i => [i.alt, i.complete, i.naturalWidth, i.src.slice(0, 22)])")
        headings = browser.execute_script("return Array.from(document.querySelectorAll('h2')).map(h => h.textContent)")
        tables = browser.execute_script(
            "return Array.from(document.querySelectorAll('table')).map(t => t.querySelectorAll('tbody tr').length)")
    finally:
        browser.quit()
    titles = ["Accuracy against timesteps", "Accuracy against energy",
              "Per-layer spikes, synaptic ops, energy and latency", "Firing rates per layer", "Confusion matrices",
              "Spike raster", "Weight quantisation error", "Distillation curve"]
    assert [alt for alt, *_ in images] == titles
    for alt, complete, width, source in images:
        assert complete and width > 0, f"image {alt!r} did not load"
        assert source == "data:image/png;base64,", "the page must be self-contained"
    assert {"Targets", "Gates", "Loihi quantisation", "Distillation", "Provenance", "Glossary"} <= set(headings)
    # nir + loihi rows; the check's gates; each netx layer; one run; provenance rows
    assert tables[0] == 2 and tables[1] >= 1 and tables[2] >= 3 and tables[3] == 1 and tables[4] >= 6
    names = ["accuracy_vs_timesteps", "accuracy_vs_energy", "per_layer", "firing_rates", "confusion",
             "spike_raster", "quantization_error", "distillation"]
    plots = sorted(p.name for p in (folder / "runs" / "ci" / "plots").iterdir())
    assert plots == sorted([f"{name}.png" for name in names] + [f"{name}.svg" for name in names])
    for name in names:
        assert (folder / "runs" / "ci" / "plots" / f"{name}.svg").read_text().lstrip().startswith("<?xml")


@pytest.mark.parametrize("text,match", [
    ("[distil]\nrounds = 1\n", r"unknown section \[distil\]"),
    ("[distill]\nrounds = 'many'\n", r"\[distill\]: rounds = 'many': 'many' is not a valid integer"),
    ("[distill]\nroundz = 1\n", r"\[distill\]: unknown key 'roundz'"),
    ("[distill]\nresume = 'runs/x'\n", r"unknown key 'resume'"),
    ("[export]\ntargets = ['loihi', 'tflite']\n", r"\[export\]: targets must be a list of nir, loihi, onnx"),
    ("[check]\ntargets = ['loihi']\nmin-acuracy = 1\n", r"unknown key 'min-acuracy'"),
    ("[check]\ntargets = ['spinnaker']\n", r"targets must be a non-empty list of nir, loihi, lava"),
    ("[report]\nenabled = 'yes'\n", r"\[report\]: the only key is enabled"),
    ("[export]\ntargets = ['nir']\n[check]\ntarget = 'lava'\n", r"target lava needs \[export\] targets to include loihi"),
])
def test_bad_pipeline_files_are_refused_before_distilling(tmp_path, monkeypatch, text, match):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "p.toml").write_text(text)
    with pytest.raises(ConfigError, match=match):
        run_pipeline("p.toml")
    assert not (tmp_path / "runs").exists()


def test_missing_pipeline_file_exits_2(tmp_path):
    process = stars_deploy("pipeline", "nope.toml", cwd=tmp_path)
    assert process.returncode == 2 and "pipeline config nope.toml does not exist" in process.stderr


def test_report_markdown_summary_for_a_pull_request(pipeline_run):
    folder, _ = pipeline_run
    process = stars_deploy("report", "runs/ci", "--format", "md", "--quiet", cwd=folder)
    assert process.returncode == 0, process.stderr
    text = process.stdout
    assert text.startswith("### stars-deploy: ci") and (folder / "runs" / "ci" / "report.md").read_text() == text
    assert "| loihi | 450 | float student |" in text and "| nir | 450 | float student |" in text
    assert "Gates on loihi" in text and " %" in text and "J (Loihi 1)" in text
