"""Our NIR file read by other tools' own importers (issue 17), compared with our reference.

Random-weight students (random BatchNorm statistics, BatchNorm gains x3 so that every layer
spikes) are exported with student_to_nir and write_nir: the convnet (LIF), the spiking ResNet
(LIF, average pool, residual merges) and the convnet with CUBA neurons (CubaLIF). SAMPLES
held-out digits (normalised) go through our float reference executor
(targets/nir_reference.NIRReference) and through each reader in its own virtual environment
(tools/interop/setup.sh builds them under .venv-interop/<reader>/), one subprocess per case
running tools/interop/run_<reader>.py on the whole batch at once.

A case is exact when every spike of every layer equals ours (where the reader exposes spikes;
the exact ones must) and every logit at every step is within LOGIT_ATOL of ours; agreement is
the share of samples whose prediction (argmax of the mean logits over T) equals ours.

CASES below is what docs/deploy.md's table says. A case claimed exact (as released, or with a
stated reader-side setting) fails when it is not; in CI (CI=true) it also fails when its venv
is missing, so CI proves it (`make test` builds the norse and snntorch venvs). A case claimed
not exact is skipped without its venv, and fails if it becomes exact or fails differently
from what the table says, so the table is kept true. Every case run writes its row into
RESULTS (JSON); tools/interop/table.py prints docs/deploy.md's table from it.
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from stars_deploy.data import load_digits_split
from stars_deploy.exporters.nir_export import student_to_nir
from stars_deploy.exporters.nir_format import read_nir, write_nir
from stars_deploy.targets.nir_reference import NIRReference
from stars_deploy.teachers import NORMALIZATIONS

ROOT = Path(__file__).resolve().parents[1]
VENVS = Path(os.environ.get("STARS_INTEROP_VENVS", ROOT / ".venv-interop"))
RESULTS = Path(os.environ.get("STARS_INTEROP_RESULTS", ROOT / "build" / "interop" / "results.json"))
LOGIT_ATOL = 1e-5
SAMPLES = 64
BN_GAIN = 3.0
RUN_TIMEOUT_S = 600
IN_CI = os.environ.get("CI", "").lower() == "true"


@dataclass(frozen=True)
class Case:
    id: str
    reader: str
    args: tuple = ()
    student: str = "convnet"  # a key of STUDENTS
    claim: str = "not exact"  # "exact" | "exact with setting" | "not exact"
    setting: str = ""
    reason: str = ""  # why not exact, for the table
    fails_with: str | None = None  # the import error a reader that cannot load the file gives
    must_fail: bool = True  # False: it may also run (and must then be wrong)


CASES = [
    Case("norse", "norse", claim="exact",
         setting="from_nir(graph, dt=dt_s): dt is from_nir's own argument (default 1e-3)"),
    Case("snntorch", "snntorch", claim="exact with setting",
         setting="dt = dt_s: import_from_nir hard-codes dt = 1e-4 s, so the runner scales every tau "
                 "by 1e-4/dt_s before importing"),
    Case("snntorch-as-released", "snntorch", ("--dt", "1e-4"),
         setting="none (its built-in dt = 1e-4 s)",
         reason="import_from_nir hard-codes dt = 1e-4 s and reads no metadata: tau = 2 ms gives "
                "beta = 0.95 and threshold 1 / 0.05 = 20 instead of 0.5 and 2"),
    Case("sinabs", "sinabs", fails_with="truth value of an array",
         reason="from_nir fails on `any(node.v_leak)` with a multi-dimensional v_leak, which every conv "
                "LIF layer has (NIR 1.0.8 sets LIF shapes from its parameters); sinabs pins nir<=1.0.4, "
                "which has the same LIF check and no v_reset"),
    Case("sinabs-flat-v-leak", "sinabs", ("--flat-v-leak",),
         setting="v_leak flattened to 1-D before from_nir (a workaround, to measure the rest)",
         reason="its LIF is another model: tau read as steps (alpha = exp(-1/tau), so ~0 for tau in "
                "seconds), input not scaled by dt/tau, spike at v >= threshold, reset by subtraction; "
                "no dt or reset setting exists in from_nir"),
    Case("spyx", "spyx", setting="from_nir(graph, x, dt=dt_s), input (T, B, H, W, C)",
         reason="spyx.nn.LIF ignores r, v_leak, v_reset: V = beta V + x (no dt/tau on the input), spikes "
                "on the previous step's V, resets by subtraction; its Flatten flattens (H, W, C) while "
                "the Affine's columns are NIR's (C, H, W)"),
    Case("rockpool", "rockpool", fails_with="Cannot convert",
         reason="from_nir maps no Conv2d, Flatten or pooling node, and its LIF branch reads node.tau_mem, "
                "which nir.LIF does not have: no conv student (nor a dense LIF one) can be imported"),
]
CASES += [
    Case("norse resnet", "norse", student="resnet", fails_with="mat1 and mat2 shapes cannot be multiplied",
         must_fail=False,
         reason="from_nir has no AvgPool2d mapping (the node is dropped) and nirtorch.load's graph "
                "executor feeds a merge node only its first input (\"Multiple input nodes found\"), so "
                "residual blocks lose their shortcut; from one process to the next it either fails in the "
                "readout or returns a 256-wide output"),
    Case("snntorch resnet", "snntorch", student="resnet", claim="exact with setting", setting="dt = dt_s (as above)"),
    Case("norse convnet-cuba", "norse", student="convnet-cuba", claim="exact",
         setting="from_nir(graph, dt=dt_s): NIR's CubaLIF, i += dt/tau_syn (w_in x - i), with our "
                 "w_in = tau_syn/dt is Norse LIFCell's i += x (then decay)"),
    Case("snntorch convnet-cuba", "snntorch", student="convnet-cuba", fails_with="r not supported in CubaLIF",
         reason="import_from_nir asserts r = tau_mem/dt for CubaLIF (its own export form); ours is r = 1"),
]
EXACT_CLAIMS = ("exact", "exact with setting")
STUDENTS = {  # kind -> (family, tau_syn_steps)
    "convnet": ("convnet", None),
    "resnet": ("resnet", None),
    "convnet-cuba": ("convnet", 3.0),
}


@pytest.fixture(scope="module")
def interop_case(tmp_path_factory):
    """kind -> (nir path, inputs path, reference TargetResult, metadata), each built once."""
    from stars_deploy.students.neurons import LIFConfig
    from stars_deploy.students import StudentConfig, build_student
    from conftest import randomize_batchnorm

    built = {}

    def make(kind: str):
        if kind in built:
            return built[kind]
        family, tau_syn_steps = STUDENTS[kind]
        torch.manual_seed(0)
        config = StudentConfig(family=family, width=8, depth=3 if family == "convnet" else 8, timesteps=6,
                               lif=LIFConfig(tau_syn_steps=tau_syn_steps))
        student = randomize_batchnorm(build_student(config))
        with torch.no_grad():
            for module in student.modules():
                if isinstance(module, torch.nn.BatchNorm2d):
                    module.weight.mul_(BN_GAIN)
        mean, std = NORMALIZATIONS["digits"]
        directory = tmp_path_factory.mktemp(f"interop-{kind}")
        nir_path, inputs_path = directory / "student.nir", directory / "inputs.npz"
        write_nir(nir_path, student_to_nir(student, normalization=(list(mean), list(std))))
        images = load_digits_split("test").images[:SAMPLES]
        inputs = ((images - mean[0]) / std[0]).float()
        reference = NIRReference(read_nir(nir_path))
        np.savez(inputs_path, inputs=inputs.numpy(), T=reference.timesteps, dt=reference.dt_s)
        result = reference.run(inputs)
        for name, spikes in result.spikes.items():
            assert 0.01 < float(spikes.mean()) < 0.6, f"{kind}: {name} should spike (rate {spikes.mean():.3f})"
        built[kind] = (nir_path, inputs_path, result, {"dt_s": reference.dt_s, "timesteps": reference.timesteps,
                                                       "spike_names": dict(reference.spike_names)})
        return built[kind]
    return make


def _venv_info(reader: str) -> dict:
    path = VENVS / reader / "interop.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _record(case: Case, row: dict) -> None:
    """Merge this case's row into RESULTS (rows kept in CASES order)."""
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    data = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    rows = {r["id"]: r for r in data.get("rows", [])}
    rows[case.id] = row
    order = [c.id for c in CASES]
    data.update({"rows": sorted(rows.values(), key=lambda r: order.index(r["id"]) if r["id"] in order else 99),
                 "reference": "stars-deploy targets/nir_reference.NIRReference",
                 "student": (f"random students (width 8; convnet depth 3, resnet depth 8; T 6, tau_mem 2 "
                             f"steps, cuba: tau_syn 3 steps), BatchNorm gains x{BN_GAIN:g}"),
                 "inputs": f"{SAMPLES} held-out digits, normalised, one batch", "logit_atol": LOGIT_ATOL})
    RESULTS.write_text(json.dumps(data, indent=1) + "\n")


def _compare(out_path: Path, reference, spike_names: dict) -> dict:
    """Logits, agreement and spikes of a runner's result against ours; ``spike_names`` maps NIR
    node names (the runners') to the student's spike names (the reference's)."""
    with np.load(out_path, allow_pickle=False) as archive:
        logits = archive["logits"]
        spikes = {key[len("spikes/"):]: archive[key] for key in archive.files if key.startswith("spikes/")}
        info = json.loads(str(archive["info"]))
    ours = reference.logits_t.numpy()
    if logits.shape != ours.shape:
        return {"info": info, "wrong_shape": f"logits {list(logits.shape)}, ours {list(ours.shape)} (T, B, K)",
                "max_logit_diff": None, "agreement": None, "spike_mismatches": None, "spikes_compared": 0,
                "spike_layers": [], "per_layer_mismatches": {}}
    mismatches, compared, per_layer = 0, 0, {}
    for node, value in spikes.items():
        layer = spike_names.get(node, node)
        assert layer in reference.spikes, f"the runner reports spikes of {node!r}, which we do not have"
        ref = reference.spikes[layer].numpy()
        assert value.size == ref.size, f"{node}: {value.shape} spikes, ours {ref.shape}"
        wrong = int((value.reshape(ref.shape) != ref).sum())
        per_layer[layer] = wrong
        mismatches, compared = mismatches + wrong, compared + ref.size
    agreement = float((logits.mean(0).argmax(-1) == ours.mean(0).argmax(-1)).mean())
    return {"info": info, "max_logit_diff": float(np.abs(logits - ours).max()), "agreement": agreement,
            "spike_mismatches": mismatches if spikes else None, "spikes_compared": compared,
            "spike_layers": sorted(per_layer), "per_layer_mismatches": per_layer}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_reader_reads_our_nir_file(case, interop_case, tmp_path):
    nir_path, inputs_path, reference, meta = interop_case(case.student)
    python = VENVS / case.reader / "bin" / "python"
    if not python.is_file():
        message = (f"no venv for {case.reader} at {python.parent.parent} "
                   f"(build it with tools/interop/setup.sh {case.reader})")
        if IN_CI and case.claim in EXACT_CLAIMS:
            pytest.fail(f"CI must prove the {case.claim} claim for {case.id}: {message}")
        pytest.skip(message)
    out_path = tmp_path / "out.npz"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONNOUSERSITE="1")
    env.pop("PYTHONPATH", None)
    command = [str(python), str(ROOT / "tools" / "interop" / f"run_{case.reader}.py"), "--nir", str(nir_path),
               "--inputs", str(inputs_path), "--out", str(out_path), *case.args]
    run = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    venv = _venv_info(case.reader)
    row = {"id": case.id, "reader": case.reader, "student": case.student, "version": venv.get("version"), "nir": venv.get("nir"),
           "install_s": venv.get("install_s"), "claim": case.claim, "setting": case.setting,
           "samples": SAMPLES, "timesteps": meta["timesteps"], "dt_s": meta["dt_s"],
           "date": datetime.date.today().isoformat(), "python": sys.version.split()[0]}
    if run.returncode != 0:
        error = (run.stderr.strip().splitlines() or ["(no output)"])[-1]
        row.update(status="fails to import", error=error, reason=case.reason, max_logit_diff=None,
                   agreement=None, spike_mismatches=None, spikes_compared=0)
        _record(case, row)
        assert case.fails_with is not None, f"{case.id} failed (rc {run.returncode}):\n{run.stderr[-4000:]}"
        assert case.fails_with in run.stderr, (f"{case.id} fails differently from what the table says "
                                               f"({case.fails_with!r}):\n{run.stderr[-4000:]}")
        return
    measured = _compare(out_path, reference, meta["spike_names"])
    exact = (measured["max_logit_diff"] is not None and measured["max_logit_diff"] <= LOGIT_ATOL
             and (measured["spike_mismatches"] == 0 if measured["spike_mismatches"] is not None else True))
    status = ("exact" if case.claim == "exact" else "exact with setting") if exact else "not exact"
    if "wrong_shape" in measured:
        status = "wrong output"
    row.update(status=status, reason="" if exact else case.reason, settings=measured["info"].get("settings"),
               error=measured.get("wrong_shape"),
               **{k: measured[k] for k in ("max_logit_diff", "agreement", "spike_mismatches", "spikes_compared",
                                           "per_layer_mismatches")})
    row["version"] = measured["info"].get("version", row["version"])
    _record(case, row)
    assert case.fails_with is None or not case.must_fail, (
        f"{case.id} imported the file, but the table says it fails ({case.fails_with!r})")
    if case.claim in EXACT_CLAIMS:
        assert measured["spike_mismatches"] == 0 and set(measured["spike_layers"]) == set(reference.spikes), (
            f"{case.id}: spikes must be compared in every layer and equal: {measured['per_layer_mismatches']}")
        assert measured["max_logit_diff"] <= LOGIT_ATOL, f"{case.id}: logits differ by {measured['max_logit_diff']}"
        assert measured["agreement"] == 1.0
    else:
        assert not exact, f"{case.id} is now exact ({case.setting or 'as released'}): update CLAIMS and docs/deploy.md"
