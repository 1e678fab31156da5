"""Fuzzing the run-time readers: distill options (command line and a pipeline's [distill]
table), run manifests and distillation checkpoints.

Seeded (FUZZ_SEED, change it to explore) and bounded in time (each test stops after its
budget; the whole file takes well under a minute on one core). Every mutation is invalid or
harmless by construction; the outcome must be either exit code 2 with exactly one
``stars-deploy: error:`` line (never a traceback, never exit 3 "internal error", never exit
0 for an invalid value), or, for a mutation that leaves the file valid, a result equal to
the unmutated one.
"""

from __future__ import annotations

import copy
import json
import math
import random
import shutil
import time
from pathlib import Path

import pytest
import torch

from stars_deploy.cli import main
from stars_deploy.distillation import distill, make_config, read_run_config
from stars_deploy.distillation.options import DISTILL_OPTIONS
from stars_deploy.errors import StarsDeployError
from stars_deploy.layout import CHECKPOINT, DISTILL, MANIFEST, STUDENT

FUZZ_SEED = 15
CASE_BUDGET_S = 6.0  # per test

# Values no option of the kind accepts: non-finite, beyond float32, malformed.
BAD_FLOATS = ["nan", "inf", "-inf", "NaN", "1e39", "-1e39", "abc", "", "1,5", "0x1p3", "--", "1e400"]
BAD_INTS = ["1.5", "abc", "", "nan", "1e3", "0.0", "--", "½", "9" * 400 + ".5"]
STRING_BAD = {"device": ["tpu", "cuda:-1", "cuda:x", "", "cpu0"], "name": ["a/b", "..", ".", "", "x\0y", "/abs"],
              "normalization": ["nan/nan", "1,2/3", "a/b", "0.5/0", "0.5/-1", "1/inf", "/", "1//2"],
              "weights": ["/nonexistent/teacher.pt"]}
# Options whose valid values are all positive: a negative or zero one is always refused.
POSITIVE = {"rounds", "budget-s", "kd-steps", "kd-batch-size", "kd-lr", "kd-temperature", "batch-size",
            "synthesis-steps", "timesteps", "width", "depth", "eval-every", "checkpoint-every", "student-every",
            "bn-groups", "pool-memory-mb", "generator-lr", "surrogate-alpha", "tau-mem-steps", "tau-syn-steps"}
NON_NEGATIVE = {"l-bn", "l-ce", "l-adv", "l-tv", "l-l2", "l-rca", "l-tar", "b-rca", "synthesis-lr", "seed"}


def run_main(capsys, args) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in args])
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def assert_clean_refusal(code, err, context) -> None:
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("stars-deploy: error: ")]
    assert code == 2, f"{context}: exit {code}\n{err}"
    assert len(errors) == 1 and "internal error" not in errors[0], f"{context}: {err}"
    assert "Traceback" not in err, f"{context}: {err}"


def cases(seed_offset: int):
    """A seeded random generator and a deadline for one test."""
    return random.Random(FUZZ_SEED + seed_offset), time.monotonic() + CASE_BUDGET_S


def bad_value(rng: random.Random, option) -> str:
    if option.kind is float:
        pool = BAD_FLOATS + (["-1", "0", "-1e-9"] if option.flag in POSITIVE else []) + \
            (["-1", "-1e-30"] if option.flag in NON_NEGATIVE else [])
    elif option.kind is int:
        pool = BAD_INTS + (["0", "-1", "-7"] if option.flag in POSITIVE else []) + \
            (["-1"] if option.flag in NON_NEGATIVE else [])
    elif option.choice_list() is not None:
        pool = ["", "x", option.choice_list()[0].upper() + "!", "none;rm", " " + option.choice_list()[0]]
    else:
        pool = STRING_BAD.get(option.flag, [""])
    return rng.choice(pool)


def fuzzable_options():
    return [o for o in DISTILL_OPTIONS if o.kind in (int, float) or o.choice_list() is not None or o.flag in STRING_BAD]


def test_fuzz_distill_options_on_the_command_line(capsys, tmp_path, digits_teacher):
    rng, deadline = cases(0)
    options, done = fuzzable_options(), 0
    while time.monotonic() < deadline or done < 20:
        chosen = rng.sample(options, rng.randint(1, 3))
        args = ["distill", "--runs-dir", tmp_path / "runs", "--rounds", "1"]
        for option in chosen:
            args += [f"--{option.flag}", bad_value(rng, option)]
        code, out, err = run_main(capsys, args)
        assert_clean_refusal(code, err, args)
        assert not (tmp_path / "runs").exists(), args
        done += 1
        if done >= 400:
            break


TOML_BAD = [1.7, -3, 0, float("nan"), float("inf"), -float("inf"), 1e39, "7", "", True, [1], {"a": 1}, 2**70,
            "nan", [], "../x"]


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else ("inf" if value == math.inf else "-inf" if value == -math.inf
                                                else repr(value))
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + " }"
    return str(value)


def _invalid_for(option, value) -> bool:
    """Whether ``value`` is certainly invalid for ``option`` (the fuzz only sends those)."""
    numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
    if option.kind is bool:
        return not isinstance(value, bool)
    if option.kind is int:
        return not (isinstance(value, int) and not isinstance(value, bool)) or \
            (option.flag in POSITIVE and value < 1) or (option.flag in NON_NEGATIVE and value < 0)
    if option.kind is float:
        return not numeric or not math.isfinite(value) or abs(value) > 3.4e38 or \
            (option.flag in POSITIVE and value <= 0) or (option.flag in NON_NEGATIVE and value < 0)
    if option.choice_list() is not None:
        return value not in option.choice_list()
    return not isinstance(value, str)


def test_fuzz_pipeline_distill_tables(capsys, tmp_path, monkeypatch, digits_teacher):
    import stars_deploy.distillation as distill_package

    def never(*args, **kwargs):
        raise AssertionError("an invalid [distill] table reached the distillation")

    monkeypatch.setattr(distill_package, "distill", never)
    monkeypatch.chdir(tmp_path)
    rng, deadline = cases(1)
    options, done = [o for o in DISTILL_OPTIONS if o.name not in ("runs_dir",)], 0
    while time.monotonic() < deadline or done < 20:
        option = rng.choice(options)
        value = rng.choice(TOML_BAD)
        if not _invalid_for(option, value) and not (option.name == "run_name" and value == "../x"):
            continue
        extra = rng.choice(["", "batch-size = 16\n", "no-eval = true\n", "objective = 'stars'\n"])
        text = f"[distill]\n{extra}{option.flag} = {_toml_value(value)}\n[export]\ntargets = ['nir']\n"
        (tmp_path / "p.toml").write_text(text)
        code, _, err = run_main(capsys, ["pipeline", "p.toml", "--device", "cpu"])
        assert_clean_refusal(code, err, text)
        done += 1
        if done >= 300:
            break


def test_fuzz_truncated_and_flipped_pipeline_files(capsys, tmp_path, monkeypatch, digits_teacher):
    """Truncations and byte flips of a valid file: refused in one line, or (when still valid)
    handed to the distillation as a configuration, never anything else."""
    import stars_deploy.distillation as distill_package

    class Reached(BaseException):  # not an Exception: the CLI would report it as an internal error
        pass

    def reached(config, **kwargs):
        raise Reached()

    monkeypatch.setattr(distill_package, "distill", reached)
    monkeypatch.chdir(tmp_path)
    source = ("[distill]\nrounds = 6\nbatch-size = 64\nkd-batch-size = 64\neval-every = 3\nname = \"ci\"\n"
              "kd-lr = 0.002\n[export]\ntargets = [\"nir\", \"loihi\"]\n[check]\ntargets = [\"loihi\"]\n"
              "min-accuracy = 0.5\n[report]\nenabled = false\n").encode()
    rng, deadline = cases(2)
    done = 0
    while time.monotonic() < deadline or done < 20:
        data = bytearray(source)
        if rng.random() < 0.4:
            data = data[:rng.randrange(len(data))]
        else:
            for _ in range(rng.randint(1, 3)):
                data[rng.randrange(len(data))] = rng.randrange(256)
        (tmp_path / "p.toml").write_bytes(bytes(data))
        try:
            code, _, err = run_main(capsys, ["pipeline", "p.toml", "--device", "cpu"])
        except Reached:
            continue  # still a valid file: a configuration was built from it
        assert_clean_refusal(code, err, bytes(data))
        done += 1
        if done >= 300:
            break


# ---- manifests -------------------------------------------------------------------------------
def _paths(value, prefix=()):
    """Every (path, leaf) inside nested dicts and lists."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _paths(item, prefix + (key,))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _paths(item, prefix + (index,))
    yield prefix, value


def _set(document, path, value):
    target = document
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value


def _delete(document, path):
    target = document
    for key in path[:-1]:
        target = target[key]
    del target[path[-1]]


WRONG = [None, True, -1, 0, 1.5, float("nan"), 1e308, "", "x", [], {}, [1, 2], {"a": 1}, 2**64]


def test_fuzz_run_manifests(capsys, tmp_path, digits_run_dir):
    run = digits_run_dir(tmp_path / "runs" / "r")
    original = json.loads((run / MANIFEST).read_text())
    original.update(status="complete", processes=1, dt_s=1e-3, created="20261202-000000")
    (run / MANIFEST).write_text(json.dumps(original))
    reference = read_run_config(run)
    text = (run / MANIFEST).read_bytes()
    rng, deadline = cases(3)
    done = via_cli = 0
    while time.monotonic() < deadline or done < 30:
        kind = rng.choice(["truncate", "flip", "delete", "retype"])
        if kind in ("truncate", "flip"):
            data = bytearray(text)
            if kind == "truncate":
                data = data[:rng.randrange(len(data))]
            else:
                data[rng.randrange(len(data))] = rng.randrange(256)
            payload = bytes(data)
        else:
            document = copy.deepcopy(original)
            path = rng.choice([p for p, _ in _paths(document) if p])
            if kind == "delete":
                _delete(document, path)
            else:
                _set(document, path, rng.choice(WRONG))
            payload = json.dumps(document).encode()
        (run / MANIFEST).write_bytes(payload)
        try:
            config = read_run_config(run)
        except StarsDeployError as exc:
            assert str(run / MANIFEST) in str(exc) and "\n" not in str(exc), (payload, exc)
            if via_cli < 15:  # and the same through a command: one line, exit 2
                code, _, err = run_main(capsys, ["export", "--target", "nir", run])
                assert_clean_refusal(code, err, payload)
                via_cli += 1
        else:  # still valid: a key without meaning was touched, or a value the schema allows
            assert isinstance(config, type(reference)), payload
        done += 1
        if done >= 500:
            break
    (run / MANIFEST).write_bytes(text)
    assert read_run_config(run) == reference


# ---- checkpoints -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory, digits_teacher):
    folder = tmp_path_factory.mktemp("fuzz-checkpoint")
    config = make_config(rounds=2, checkpoint_every=1, kd_steps=1, kd_batch_size=8,
                         synthesis={"batch_size": 8, "steps": 1}, eval_data=None)
    run = Path(distill(config, runs_dir=folder, run_name="run")["run_dir"])
    (run / DISTILL).unlink()
    (run / STUDENT).unlink()
    manifest = json.loads((run / MANIFEST).read_text())
    manifest["status"] = "running"
    (run / MANIFEST).write_text(json.dumps(manifest))
    return run


def test_fuzz_distillation_checkpoints(capsys, tmp_path, stopped_run):
    """Truncations and bit flips of the file, deleted keys and wrong types: every one refused
    in one line by `distill --resume`, and the run directory left as it was."""
    from stars_deploy.runs import content_digest

    original_bytes = (stopped_run / CHECKPOINT).read_bytes()
    checkpoint = torch.load(stopped_run / CHECKPOINT, weights_only=True)
    original_digest = content_digest(checkpoint)
    rng, deadline = cases(4)
    work = tmp_path / "run"
    shutil.copytree(stopped_run, work)
    done = 0
    while time.monotonic() < deadline or done < 12:
        kind = rng.choice(["truncate", "flip", "delete", "retype", "tensor"])
        if kind in ("truncate", "flip"):
            data = bytearray(original_bytes)
            if kind == "truncate":
                data = data[:rng.randrange(len(data))]
            else:
                for _ in range(rng.randint(1, 4)):
                    data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
            (work / CHECKPOINT).write_bytes(bytes(data))
        else:
            broken = copy.deepcopy(checkpoint)
            paths = [p for p, _ in _paths(broken) if p and not isinstance(p[-1], int) or len(p) == 1]
            path = rng.choice([p for p in paths if p != ("sha256",)])  # without it: a valid older checkpoint
            if kind == "delete":
                _delete(broken, path)
            elif kind == "retype":
                _set(broken, path, rng.choice(WRONG[:-1]))
            else:
                tensors = [p for p, v in _paths(broken) if isinstance(v, torch.Tensor) and v.numel() > 0]
                tensor_path = rng.choice(tensors)
                target = broken
                for key in tensor_path:
                    target = target[key]
                replacement = rng.choice([lambda t: t.flatten()[:1], lambda t: t.double(),
                                          lambda t: torch.full_like(t.float(), float("nan")),
                                          lambda t: torch.zeros(0)])
                _set(broken, tensor_path, replacement(target))
            torch.save(broken, work / CHECKPOINT)
        try:  # a flip in the zip's padding changes no content: a valid file, rightly accepted
            unchanged = content_digest(torch.load(work / CHECKPOINT, weights_only=True)) == original_digest
        except Exception:
            unchanged = False
        if unchanged:
            continue
        before = sorted(p.name for p in work.iterdir())
        code, _, err = run_main(capsys, ["distill", "--resume", work])
        assert_clean_refusal(code, err, kind)
        assert sorted(p.name for p in work.iterdir()) == before
        done += 1
        if done >= 60:
            break
