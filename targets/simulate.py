"""``stars-deploy simulate``: run an exported file on a target, on evaluation data, and compare.

The target (targets/registry.py) runs the file of the export it names: inside a run
directory RUN_DIR/export/<file>, or a file given directly. ``--compare student`` compares
with the run's student with BatchNorm folded (the student as shipped); a target name runs
that target on the same images (the same export's file for it); ``none`` compares with
nothing. Fixed-point records hold each layer's T-step window (the pipeline delay undone,
targets/loihi.py), so spikes compare step by step with the float targets too.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

import torch

from stars_deploy.data import load_eval_data
from stars_deploy.devices import resolve_device
from stars_deploy.distillation.config import read_run_config
from stars_deploy.errors import ConfigError, DataError
from stars_deploy.fileio import read_json, write_json
from stars_deploy.layout import MANIFEST, STUDENT, simulation_file, simulation_files
from stars_deploy.progress import log, progress_bar
from stars_deploy.runs import is_converted, read_convert_record, sha256_file
from stars_deploy.teachers import Normalizer

from .record import Tally, TargetResult, summarize
from .registry import (REFERENCE_NONE, REFERENCE_STUDENT, compare_choices, exported_file, get_target,
                       sibling_file, targets)
from .stimulus import InputFile, read_inputs
from .target import RunnerOptions, Target

BATCH = 256
DEFAULT_DATA = "digits"
DIGITS_SHAPE = (1, 8, 8)  # what the default data (scikit-learn's digits) feeds a student


def simulation_request(data: str, samples: int | None, compare: str, dt_s: float | None = None,
                       timesteps: int | None = None, loihi2_pj_per_op: float | None = None) -> dict:
    """What a simulation was asked for, stored with its result (``check`` reuses a result
    only for the same request on the same file)."""
    return {"data": data, "samples": samples, "compare": compare, "dt_s": dt_s, "timesteps": timesteps,
            "loihi2_pj_per_op": loihi2_pj_per_op}


def _student_record(student, images: torch.Tensor) -> TargetResult:
    with torch.no_grad():
        out = student(images)
    steps, batch = out.logits_t.shape[:2]
    neurons = sum(s[0, 0].numel() for s in out.spikes.values())
    return TargetResult(REFERENCE_STUDENT, out.logits_t, out.spikes, {},
                        neuron_updates=float(neurons * steps * batch))


def resolve_file(path: Path, target: Target) -> tuple[Path, Path | None]:
    """(the file ``target`` runs, its run directory or None) for a file or a run directory."""
    path = Path(path)
    if path.is_dir():
        candidate = exported_file(target, path)
        if not candidate.is_file():
            raise ConfigError(f"{path} has no export/{candidate.name}: run `stars-deploy export --target "
                              f"{target.export} {path}` first")
        return candidate, path
    run_dir = path.parent.parent
    return path, run_dir if (run_dir / STUDENT).is_file() or is_converted(run_dir) else None


def model_inputs(metadata: dict, images: torch.Tensor) -> torch.Tensor:
    """[0, 1] images as the exported file takes them: normalised as its metadata says."""
    normalization = metadata.get("normalization")
    return Normalizer(normalization["mean"], normalization["std"])(images) if normalization else images


def run_eval_data(run_dir: Path | None) -> str:
    """The data a run was evaluated on during distillation (its manifest) or conversion (its
    convert.json), else the digits; a run of another input shape without evaluation data is
    refused (the digits would not fit its network)."""
    converted = read_convert_record(run_dir) if run_dir is not None else None
    if converted is not None:
        if converted.get("eval_data"):
            return str(converted["eval_data"])
        shape = tuple(converted["spec"].input_shape)
        if shape != DIGITS_SHAPE:
            raise ConfigError(f"{run_dir} was converted without evaluation data and its network takes "
                              f"{'x'.join(map(str, shape))} inputs, not the digits: give --data (an .npz or "
                              "CIFAR folder of such images)")
    elif run_dir is not None and (Path(run_dir) / MANIFEST).is_file():
        config = read_run_config(run_dir)
        if config.eval_data:
            return config.eval_data
        shape = tuple(config.teacher.input_shape)
        if shape != DIGITS_SHAPE:
            raise ConfigError(f"{run_dir} was distilled without evaluation data and its student takes "
                              f"{'x'.join(map(str, shape))} inputs, not the digits: give --data (an .npz or "
                              "CIFAR folder of such images)")
    return DEFAULT_DATA


def _reference_runner(compare: str, target: Target, file: Path, run_dir: Path | None,
                      options: RunnerOptions) -> Callable | str | None:
    """What the results are compared with: a function of a batch, "self", or None."""
    if compare == REFERENCE_STUDENT:
        if run_dir is None:
            raise ConfigError(f"{file} is not inside a run directory: use --compare none or a target")
        if not (run_dir / STUDENT).is_file():
            raise ConfigError(f"{run_dir} holds a converted teacher, not a student: use --compare none")
        from stars_deploy.students import fold_student, load_student

        student = fold_student(load_student(run_dir / STUDENT)).to(options.device)
        return lambda batch: _student_record(student, batch.to(options.device))
    if compare == target.name:
        return "self"
    if compare == REFERENCE_NONE:
        return None
    other = get_target(compare)
    return other.load(sibling_file(file, other), options).run


def check_labels(labels: torch.Tensor | None, outputs: int, data_name: str, file: Path) -> None:
    """Refuse labels that name no output of the network (they would count as wrong answers)."""
    if labels is not None and len(labels) and int(labels.max()) >= outputs:
        raise DataError(f"{data_name}: label {int(labels.max())}, but {file} has {outputs} outputs: labels are "
                        f"class indices 0..{outputs - 1} of this network")


def _run_batches(run, reference, images: torch.Tensor, batch_size: int, labels: torch.Tensor | None = None,
                 data_name: str = "", file: Path = Path()) -> Tally:
    """The tally of every batch, each compared with ``reference`` on the same images as it
    goes (only per-layer sums are kept, so memory does not grow with the spikes); ``labels``
    are checked against the network's outputs after the first batch."""
    total = None
    bar = progress_bar(len(images), "simulate", "sample")
    try:
        for start in range(0, len(images), batch_size):
            batch = images[start:start + batch_size]
            result = run(batch).cpu()
            if start == 0:
                check_labels(labels, result.logits_t.shape[-1], data_name, file)
            other = result if reference == "self" else reference(batch).cpu() if reference is not None else None
            tally = Tally.of(result, other)
            total = tally if total is None else total + tally
            bar.update(len(batch))
    finally:
        bar.close()
    return total


def _explicit(run: Callable, given: InputFile) -> Callable:
    """A runner's ``run`` fed --inputs batches, sample-major slices made (T, B, ...) for sequences."""
    return lambda batch: run(given.batch(batch), sequence=given.sequence)


def run_warnings(runner, result: Tally) -> list[str]:
    """What the user should know about a run: the runner's own warnings (a foreign file's
    implausible time constants, fields netx ignores) and a run in which no layer spiked."""
    found = list(getattr(runner, "warnings", None) or [])
    if result.spikes_by_step and sum(result.spike_counts().values()) == 0:
        found.append(f"no layer spiked in any of the {result.samples} samples: the outputs carry no information; "
                     "check the inputs' scale and, for a file from another tool, --dt-s and the time constants")
    return found


def simulate(path: Path, target: str = "nir", data: str | None = None, samples: int | None = None,
             compare: str | None = None, dt_s: float | None = None, timesteps: int | None = None,
             device: str = "auto", loihi2_pj_per_op: float | None = None, inputs: Path | None = None) -> dict:
    """Run ``target`` on ``data`` (default: the run's own evaluation data, else digits) or on
    the explicit ``inputs`` (an .npz, targets/stimulus.py); the metrics in the common summary
    (targets.record). ``compare=None`` compares with the run's student when the file sits in a
    run directory, with nothing otherwise. Writes RUN_DIR/simulate-<target>-<request>.json inside
    a run (layout.simulation_file: one file per request)."""
    spec = get_target(target)
    file, run_dir = resolve_file(path, spec)
    has_student = run_dir is not None and (run_dir / STUDENT).is_file()
    compare = compare or (REFERENCE_STUDENT if has_student and inputs is None else REFERENCE_NONE)
    if compare not in compare_choices(spec):
        raise ConfigError(f"--compare {compare!r}: choose one of {', '.join(compare_choices(spec))}")
    if inputs is not None and (data is not None or compare == REFERENCE_STUDENT):
        raise ConfigError("--inputs gives the inputs themselves: it does not go with --data or --compare student")
    options = RunnerOptions(dt_s=dt_s, timesteps=timesteps, device=resolve_device(device))
    runner = spec.load(file, options)
    reference = _reference_runner(compare, spec, file, run_dir, options)
    run = runner.run
    if inputs is not None:
        given = read_inputs(inputs).subset(samples)
        images, labels, data_name = given.inputs, given.labels, given.name
        run = _explicit(runner.run, given)
        reference = _explicit(reference, given) if callable(reference) else reference
    else:
        if getattr(runner, "inputs_required", None):
            raise ConfigError(runner.inputs_required)
        data = data or run_eval_data(run_dir)
        eval_data = load_eval_data(data).subset(samples)
        images, labels, data_name = model_inputs(runner.metadata, eval_data.images), eval_data.labels, eval_data.name
    compared = [] if compare in (REFERENCE_STUDENT, REFERENCE_NONE) else [get_target(compare)]
    whole = any(t.whole_batch for t in (spec, *compared))  # Lava builds one network per call: all samples at once
    batch = len(images) if whole else min(BATCH, getattr(runner, "max_batch", BATCH))
    result = _run_batches(run, reference, images, batch, labels, data_name, file)
    summary = summarize(result, labels, energy=spec.energy, loihi2_pj_per_op=loihi2_pj_per_op)
    request = simulation_request(data if inputs is None else f"inputs:{inputs}", samples, compare, dt_s,
                                 timesteps, loihi2_pj_per_op)
    summary.update(file=str(file), file_sha256=sha256_file(file), data=data_name, compare=compare,
                   dt_s=dt_s if dt_s is not None else runner.metadata.get("dt_s"), request=request,
                   run_dir=str(run_dir) if run_dir is not None else None,
                   result_file=str(simulation_file(run_dir, spec.name, request)) if run_dir is not None else None,
                   conventions=spec.conventions,
                   latency_note=spec.latency_note, warnings=run_warnings(runner, result))
    for key in ("reference", "reference_accuracy", "agreement", "spike_mismatches"):
        summary.setdefault(key, None)
    for line in summary["warnings"]:
        print(f"stars-deploy: warning: {line}", file=sys.stderr, flush=True)  # also under --quiet
    if run_dir is not None:
        write_json(Path(summary["result_file"]), summary)
    accuracy = "n/a" if summary["accuracy"] is None else f"{summary['accuracy']:.1%}"
    log(f"{spec.name}: {accuracy} on {data_name} ({summary['samples']} samples) from {file}"
        + (f"; wrote {summary['result_file']}" if run_dir is not None else ""))
    return summary


def _stored(path: Path, target: str, digest: str) -> dict | None:
    """The summary stored at ``path``, with its ``result_file``, when it is ``target``'s and was
    made from the file whose sha256 is ``digest`` (a re-export makes older results stale)."""
    summary = read_json(path, "simulation result")
    if summary.get("target") != target or summary.get("file_sha256") != digest:
        return None
    return {**summary, "result_file": str(path)}


def stored_result(run_dir: Path, target: str, file: Path, request: dict) -> dict | None:
    """The stored result of exactly ``request``, made from this very ``file``, or None."""
    path = simulation_file(run_dir, target, request)
    summary = _stored(path, target, sha256_file(file)) if path.is_file() else None
    return summary if summary is not None and summary.get("request") == request else None


def stored_results(run_dir: Path, target: str, file: Path) -> list[dict]:
    """Every stored summary of ``target`` in a run made from this very ``file``."""
    digest = sha256_file(file)
    found = (_stored(path, target, digest) for path in simulation_files(run_dir, target))
    return [summary for summary in found if summary is not None]


def _pick(stored: list[dict], wanted: dict) -> dict | None:
    """The stored summary made for exactly ``wanted``; else, compared with the same reference on
    the same data, the one with the most samples; else None."""
    for summary in stored:
        if summary.get("request") == wanted:
            return summary
    alike = [s for s in stored if all(s.get("request", {}).get(k) == wanted[k] for k in ("data", "compare"))]
    return max(alike, key=lambda s: s.get("samples") or 0) if alike else None


def collect_results(run_dir: Path, data: str | None = None, samples: int | None = None,
                    device: str = "auto") -> dict[str, dict]:
    """Every exported target's summary for a run, compared with the float student on ``data``
    (default: the run's own evaluation data): the stored result of exactly that request, else
    the stored one on that data with the most samples, else (for a target whose record says
    ``report_simulates``) a fresh simulation. Results of an earlier export are never used;
    each choice is logged with its file."""
    wanted = simulation_request(data or run_eval_data(run_dir), samples, REFERENCE_STUDENT)
    summaries = {}
    for name, spec in targets().items():
        file = exported_file(spec, run_dir)
        if not file.is_file():
            continue
        chosen = _pick(stored_results(run_dir, name, file), wanted)
        if chosen is not None:
            log(f"{name}: using {chosen['result_file']} ({chosen.get('samples')} samples of {chosen.get('data')}, "
                f"compared with {chosen.get('compare')})")
            summaries[name] = chosen
        elif spec.report_simulates:
            summaries[name] = simulate(run_dir, name, wanted["data"], samples, compare=REFERENCE_STUDENT,
                                       device=device)
    return summaries


def raster_sample(run_dir: Path, summaries: dict[str, dict], device: str = "auto") -> tuple[str | None, dict]:
    """(target, its spikes per layer for one sample) on the first simulated target that
    ``report`` may run (the deployed one first: the registry's order, fixed point before float)."""
    runnable = [name for name, spec in targets().items() if name in summaries and spec.report_simulates]
    if not runnable:
        return None, {}
    name = sorted(runnable, key=lambda n: targets()[n].export == "nir")[0]
    spec = targets()[name]
    runner = spec.load(exported_file(spec, run_dir), RunnerOptions(device=resolve_device(device)))
    data = load_eval_data(summaries[name].get("request", {}).get("data") or run_eval_data(run_dir)).subset(1)
    return name, runner.run(model_inputs(runner.metadata, data.images)).cpu().spikes
