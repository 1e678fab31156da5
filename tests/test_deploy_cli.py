"""`stars-deploy export` and `stars-deploy simulate` end to end on a small run directory."""

from __future__ import annotations

import json
import re
from pathlib import Path

import nir
import numpy as np
import pytest

from stars_deploy.cli import main
from stars_deploy.distillation import DistillConfig
from stars_deploy.fileio import write_json
from stars_deploy.layout import MANIFEST, STUDENT
from stars_deploy.runs import RUN_FORMAT, sha256_file
from stars_deploy.students import save_student

REQUIRED_KEYS = {"target", "samples", "accuracy", "reference_accuracy", "agreement", "spike_mismatches",
                 "spikes_per_sample", "synops_per_sample", "latency_steps"}


def run_main(capsys, *args) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in args])
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def make_run(folder, random_student, family: str):
    """A finished-looking run: manifest + a student with random weights and BN stats."""
    student = random_student(family, timesteps=4)
    config = DistillConfig(student=student.config, rounds=1)
    write_json(folder / MANIFEST, {"format": RUN_FORMAT, "config": config.to_dict()})
    save_student(folder / STUDENT, student)
    return folder


@pytest.fixture
def run_dir(tmp_path, random_student):
    return make_run(tmp_path / "runs" / "r1", random_student, "resnet")


def test_export_nir_writes_files_record_and_layer_table_deterministically(capsys, run_dir):
    code, out, _ = run_main(capsys, "export", "--target", "nir", "--runs-dir", run_dir.parent, "--quiet")
    assert code == 0
    assert re.search(r"blocks\.1\.shortcut\s+Conv2d\s+8x8x8\s+16x4x4", out)  # the layer table
    assert re.search(r"readout\s+Affine\s+32\s+10", out)
    record = json.loads((run_dir / "export" / "export.json").read_text())
    nir_file = run_dir / "export" / "student.nir"
    assert record["files"]["student.nir"]["sha256"] == sha256_file(nir_file)
    assert record["input_shape"] == [1, 8, 8] and record["output_shape"] == [10] and record["timesteps"] == 4
    assert record["parameters"] > 0 and record["parameters"] <= record["student_parameters"]
    first = nir_file.read_bytes()
    assert run_main(capsys, "export", run_dir, "--quiet")[0] == 0
    assert nir_file.read_bytes() == first


def test_simulate_json_reports_exact_agreement_with_the_student(capsys, run_dir):
    assert run_main(capsys, "export", run_dir, "--quiet")[0] == 0
    code, out, _ = run_main(capsys, "simulate", "--target", "nir", run_dir, "--samples", 40, "--json", "--quiet")
    assert code == 0
    summary = json.loads(out)  # exactly one JSON object on stdout
    assert REQUIRED_KEYS <= set(summary)
    assert summary["target"] == "nir" and summary["samples"] == 40
    assert summary["spike_mismatches"] == 0 and summary["agreement"] == 1.0
    assert summary["accuracy"] == summary["reference_accuracy"]
    assert summary["latency_steps"] == 4 and summary["pipeline_delay_steps"] == 0
    assert set(summary["spikes_per_layer"]) == {"stem", "blocks.0.first", "blocks.0.out", "blocks.1.first",
                                                "blocks.1.out", "blocks.2.first", "blocks.2.out"}
    stored = Path(summary["result_file"])
    assert stored.parent == run_dir and stored.name.startswith("simulate-nir-")
    assert json.loads(stored.read_text())["spike_mismatches"] == 0


def test_results_are_stored_per_request_and_report_takes_the_fullest(capsys, run_dir):
    # a quick 5-sample look must not replace the 40-sample result the report and check rely on
    assert run_main(capsys, "export", run_dir, "--quiet")[0] == 0
    files = {}
    for samples in (40, 5):
        code, out, err = run_main(capsys, "simulate", "--target", "nir", run_dir, "--samples", samples, "--json")
        assert code == 0
        files[samples] = json.loads(out)["result_file"]
        assert f"({samples} samples) from {run_dir / 'export' / 'student.nir'}" in err
        assert f"wrote {files[samples]}" in err
    assert files[40] != files[5] and all(Path(f).is_file() for f in files.values())
    code, out, err = run_main(capsys, "report", run_dir, "--format", "md")
    assert code == 0 and f"nir: using {files[40]} (40 samples of digits-test[:40], compared with student)" in err
    assert re.search(r"\| nir \| 40 \|", out)
    code, out, err = run_main(capsys, "check", "--target", "nir", run_dir, "--samples", 5, "--min-accuracy", 0,
                              "--json")
    assert code == 0 and json.loads(out)["result_file"] == files[5] and json.loads(out)["reused"]


def test_a_cifar_shaped_run_without_evaluation_data_asks_for_data(capsys, tmp_path):
    # issue 16: this fell back to the digits and crashed with a reshape traceback
    from stars_deploy.students import StudentConfig, build_student
    from stars_deploy.teachers import TeacherSpec

    run_dir = tmp_path / "runs" / "cifar"
    student = build_student(StudentConfig(family="convnet", width=8, depth=3, timesteps=2, input_shape=(3, 32, 32)))
    config = DistillConfig(teacher=TeacherSpec(arch="cifar_resnet20"), student=student.config, rounds=1,
                           eval_data=None)
    write_json(run_dir / MANIFEST, {"format": RUN_FORMAT, "config": config.to_dict()})
    save_student(run_dir / STUDENT, student.eval())
    assert run_main(capsys, "export", "--target", "loihi", run_dir, "--quiet")[0] == 0
    for command in (["simulate", "--target", "loihi"], ["check", "--target", "loihi"], ["report"]):
        code, _, err = run_main(capsys, *command, run_dir)
        assert code == 2 and "Traceback" not in err, err
        assert f"{run_dir} was distilled without evaluation data and its student takes 3x32x32 inputs" in err
        assert "give --data" in err


def foreign_graph(tmp_path):
    dt, beta = 1e-4, 0.8
    tau = np.full(10, dt / (1 - beta))
    weight = np.random.default_rng(0).standard_normal((10, 64)).astype(np.float32)
    zeros = np.zeros(10, np.float32)
    graph = nir.NIRGraph(nodes={"input": nir.Input({"input": np.array([64])}),
                                "fc": nir.Affine(weight=weight, bias=zeros + 0.5),
                                "lif": nir.LIF(tau=tau, r=(tau / dt).astype(np.float32), v_leak=zeros,
                                               v_threshold=zeros + 1, v_reset=zeros),
                                "output": nir.Output({"output": np.array([10])})},
                         edges=[("input", "fc"), ("fc", "lif"), ("lif", "output")], metadata={})
    nir.write(tmp_path / "other.nir", graph)
    return tmp_path / "other.nir"


def test_simulate_runs_a_file_from_elsewhere_and_refuses_it_without_dt(capsys, tmp_path):
    path = foreign_graph(tmp_path)
    code, out, _ = run_main(capsys, "simulate", path, "--dt-s", 1e-4, "-T", 5, "--samples", 30, "--json", "--quiet")
    assert code == 0
    summary = json.loads(out)
    assert summary["compare"] == "none" and summary["spike_mismatches"] is None
    assert summary["samples"] == 30 and summary["spikes_per_sample"] > 0
    assert "Euler" in summary["conventions"]
    code, _, err = run_main(capsys, "simulate", path, "-T", 5, "--quiet")
    assert code == 2 and "node 'lif'" in err and "--dt-s" in err and "Traceback" not in err


def test_export_onnx_with_the_teacher_is_recorded_and_deterministic(capsys, run_dir, digits_teacher):
    code, out, _ = run_main(capsys, "export", "--target", "onnx", "--teacher", run_dir, "--json", "--quiet")
    assert code == 0
    payload = json.loads(out)
    record = json.loads((run_dir / "export" / "export.json").read_text())
    for name in ("student.onnx", "teacher.onnx"):
        path = run_dir / "export" / name
        assert record["files"][name]["sha256"] == sha256_file(path) == payload["files"][name]["sha256"]
    first = (run_dir / "export" / "student.onnx").read_bytes()
    assert run_main(capsys, "export", "--target", "onnx", run_dir, "--quiet")[0] == 0
    assert (run_dir / "export" / "student.onnx").read_bytes() == first


@pytest.fixture
def convnet_run_dir(tmp_path, random_student):
    """A run with a convnet student (the Loihi-deployable family)."""
    return make_run(tmp_path / "runs" / "c1", random_student, "convnet")


def test_export_loihi_prints_the_report_and_writes_the_net_file_deterministically(capsys, convnet_run_dir):
    code, out, _ = run_main(capsys, "export", "--target", "loihi", convnet_run_dir, "--quiet")
    assert code == 0
    assert re.search(r"layers\.1\.lif\s+conv\s+-?\d+\s+\d+\s+2048\s+0", out)  # quantisation row
    assert re.search(r"3\s+flatten\+dense\s+10\s+4096\s+4095\s+131071\s+\(readout: u\)", out)  # netx table
    assert "pipeline delay: 3 steps" in out
    net_file = convnet_run_dir / "export" / "student.net"
    record = json.loads((convnet_run_dir / "export" / "export.json").read_text())
    assert record["files"]["student.net"]["sha256"] == sha256_file(net_file)
    assert [row["layer"] for row in record["quantization"]] == ["layers.0.lif", "layers.1.lif", "layers.2.lif", "readout"]
    assert record["pipeline_delay_steps"] == 3 and record["readout"] == "current"
    first = net_file.read_bytes()
    assert run_main(capsys, "export", "--target", "loihi", convnet_run_dir, "--quiet")[0] == 0
    assert net_file.read_bytes() == first


def test_simulate_loihi_and_lava_share_the_json_keys_and_agree_exactly(capsys, convnet_run_dir):
    assert run_main(capsys, "export", "--target", "loihi", convnet_run_dir, "--quiet")[0] == 0
    code, out, _ = run_main(capsys, "simulate", "--target", "loihi", convnet_run_dir, "--samples", 40, "--json", "--quiet")
    assert code == 0
    loihi = json.loads(out)
    assert REQUIRED_KEYS <= set(loihi) and loihi["compare"] == "student" and loihi["target"] == "loihi"
    assert loihi["latency_steps"] == 4 + 3 and loihi["pipeline_delay_steps"] == 3
    assert loihi["agreement"] >= 0.9 and loihi["energy_per_sample"]["loihi1_j"] > 0
    assert json.loads(Path(loihi["result_file"]).read_text())["samples"] == 40
    code, out, _ = run_main(capsys, "simulate", "--target", "lava", convnet_run_dir, "--samples", 3,
                            "--compare", "loihi", "--loihi2-pj-per-op", 10, "--json", "--quiet")
    assert code == 0
    lava = json.loads(out)
    assert REQUIRED_KEYS <= set(lava) and set(lava) == set(loihi)
    assert lava["spike_mismatches"] == 0 and lava["agreement"] == 1.0 and lava["max_logit_difference"] == 0
    assert lava["energy_per_sample"]["loihi2_j"] > 0


def test_export_loihi_takes_a_foreign_nir_file_and_refuses_a_resnet(capsys, tmp_path, run_dir):
    path = foreign_graph(tmp_path)
    code, _, err = run_main(capsys, "export", "--target", "loihi", path, "-T", 5, "--quiet")
    assert code == 2 and "--dt-s" in err and "Traceback" not in err
    code, out, _ = run_main(capsys, "export", "--target", "loihi", path, "--dt-s", 1e-4, "-T", 5, "--quiet")
    assert code == 0 and (tmp_path / "other.net").is_file() and "(readout" not in out
    code, out, _ = run_main(capsys, "simulate", "--target", "loihi", tmp_path / "other.net", "--samples", 20,
                            "--compare", "nir", "--dt-s", 1e-4, "-T", 5, "--json", "--quiet")
    assert code == 0
    summary = json.loads(out)
    assert summary["compare"] == "nir" and summary["agreement"] >= 0.8
    code, _, err = run_main(capsys, "export", "--target", "loihi", run_dir, "--quiet")
    assert code == 2 and "a skip" in err and "convnet" in err
