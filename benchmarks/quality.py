"""The acceptance instrument of the quality work (issue 13): candidates side by side at one
wall-clock budget, through the real command line, evaluated on real test images.

For each candidate (a name and the extra `stars-deploy distill` options it adds) it runs

    stars-deploy distill --teacher T --weights W [--normalization N] --budget-s B \\
        --snapshot-every-s S --no-eval --json <candidate options>

alone on the machine (candidates never overlap: two torch processes on 2 cores slow each
other ~10x), then, outside the timed run, evaluates

- the final student on every image of --data (the 10,000 JPEG images) and of --also
  (the 200 lossless images), with its agreement with the teacher;
- every snapshot (the student every S seconds of distillation) on a fixed class-stratified
  subset of --data (--curve-images, 100 per class by default: the JPEG file is sorted by
  class, so its first 1,000 images are one class): the accuracy-against-time curve, which
  answers shorter budgets from the same run;
- the student exported to Loihi (`stars-deploy export --target loihi`) and run in the
  bit-accurate emulator (`stars-deploy simulate --target loihi`) on all of --data.

It prints the table (candidate, student accuracy, % of the teacher, agreement, synthetic
images, KD images, Loihi-emulator accuracy) and the curve, and writes everything as JSON.
Say which machine the numbers came from when you quote them.

    python benchmarks/quality.py --weights ../shared/data/cifar10/resnet20_teacher.th \\
        --normalization imagenet --data ../shared/data/cifar10/test_jpeg_q75.npz \\
        --also ../shared/data/cifar10/test_lossless_200.npz --budget-s 1200 \\
        --candidate default= --candidate host="--objective host" --json-out quality.json
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from stars_deploy.data import load_eval_data
from stars_deploy.devices import resolve_device
from stars_deploy.distillation import read_run_config
from stars_deploy.evaluation import accuracy, predict, student_logits_fn, teacher_logits_fn
from stars_deploy.layout import STUDENT
from stars_deploy.students import load_student
from stars_deploy.teachers import Normalizer, load_teacher

SNAPSHOT_DIR = "snapshots"


def stratified_subset(images: np.ndarray, labels: np.ndarray, per_class: int, seed: int = 0) -> np.ndarray:
    """Indices of ``per_class`` images of every class, drawn with a fixed seed."""
    rng = np.random.default_rng(seed)
    picks = [rng.permutation(np.flatnonzero(labels == label))[:per_class] for label in np.unique(labels)]
    return np.sort(np.concatenate(picks))


def write_subset(data: Path, per_class: int, folder: Path) -> Path:
    with np.load(data, allow_pickle=False) as archive:
        images, labels = archive["images"], archive["labels"]
    index = stratified_subset(images, labels, per_class)
    path = folder / f"{data.stem}-stratified{per_class}.npz"
    np.savez(path, images=images[index], labels=labels[index])
    return path


def cli(*args: str, timeout_s: float) -> dict:
    """One `stars-deploy` command with --json; its JSON object (stderr shown on failure)."""
    command = [sys.executable, "-m", "stars_deploy", *args, "--json"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
    if done.returncode != 0:
        raise RuntimeError(f"{shlex.join(command)} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout)


class Evaluator:
    """Teacher predictions on each evaluation set, computed once; students scored against them."""

    def __init__(self, run_dir: Path, sets: dict[str, Path], device: str):
        config = read_run_config(run_dir)
        self.device = resolve_device(device)
        self.normalizer = Normalizer(*config.teacher.mean_std).to(self.device)
        teacher = load_teacher(config.teacher, Path(config.teacher.weights)).to(self.device)
        self.sets = {name: load_eval_data(str(path)) for name, path in sets.items()}
        self.teacher = {name: predict(teacher_logits_fn(teacher, self.normalizer), data.images, self.device)
                        for name, data in self.sets.items()}

    def teacher_accuracy(self, name: str) -> float:
        return accuracy(self.teacher[name], self.sets[name].labels)

    def score(self, student_file: Path, name: str) -> dict:
        student = load_student(student_file).to(self.device)
        data = self.sets[name]
        predictions = predict(student_logits_fn(student, self.normalizer), data.images, self.device)
        return {"accuracy": accuracy(predictions, data.labels), "agreement": accuracy(predictions, self.teacher[name])}


def run_candidate(name: str, options: list[str], args, subset: Path) -> dict:
    runs_dir = args.runs_dir / name
    teacher = ["--teacher", args.teacher, "--weights", str(args.weights)]
    if args.normalization:
        teacher += ["--normalization", args.normalization]
    begin = time.perf_counter()
    summary = cli("distill", *teacher, "--budget-s", str(args.budget_s), "--snapshot-every-s",
                  str(args.snapshot_every_s), "--no-eval", "--runs-dir", str(runs_dir), "--seed", str(args.seed),
                  "--device", args.device, *options, timeout_s=args.budget_s * 3 + 600)
    wall_s = time.perf_counter() - begin
    run_dir = Path(summary["run_dir"])
    sets = {"data": args.data, "curve": subset, **({"also": args.also} if args.also else {})}
    evaluator = Evaluator(run_dir, sets, args.device)
    result = {"candidate": name, "options": options, "run_dir": str(run_dir), "wall_s": wall_s,
              "synthetic_images": summary["synthetic_images"], "kd_images": summary["kd_images"],
              "rounds": summary["rounds"], "distill_time_s": summary["distill_time_s"],
              "teacher_accuracy": evaluator.teacher_accuracy("data"),
              "final": evaluator.score(run_dir / STUDENT, "data")}
    if args.also:
        result["also"] = {"teacher_accuracy": evaluator.teacher_accuracy("also"),
                          **evaluator.score(run_dir / STUDENT, "also")}
    snapshots = sorted((run_dir / SNAPSHOT_DIR).glob("student-*s.pt"),
                       key=lambda p: float(p.stem.split("-")[1][:-1]))
    result["curve"] = [{"elapsed_s": float(p.stem.split("-")[1][:-1]), **evaluator.score(p, "curve")}
                       for p in snapshots]
    result["curve"].append({"elapsed_s": summary["distill_time_s"], **evaluator.score(run_dir / STUDENT, "curve")})
    if not args.no_loihi:
        cli("export", "--target", "loihi", str(run_dir), timeout_s=1800)
        loihi = cli("simulate", "--target", "loihi", str(run_dir), "--data", str(args.data), "--device",
                    args.device, timeout_s=3600)
        result["loihi"] = {"accuracy": loihi["accuracy"], "agreement_with_student": loihi["agreement"],
                           "spikes_per_sample": loihi["spikes_per_sample"],
                           "synops_per_sample": loihi["synops_per_sample"]}
    return result


def percent(value) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}"


def print_tables(results: list[dict], args) -> None:
    print(f"\nbudget {args.budget_s:g} s per candidate; teacher {args.teacher}; data {args.data.name}")
    print("| candidate | student % | % of teacher | agreement % | synthetic images | KD images | Loihi emulator % |"
          + (" lossless % |" if args.also else ""))
    print("|---|---|---|---|---|---|---|" + ("---|" if args.also else ""))
    for r in results:
        if "error" in r:
            print(f"| {r['candidate']} | failed: {r['error'][:120]} |")
            continue
        final, teacher = r["final"], r["teacher_accuracy"]
        row = (f"| {r['candidate']} | {percent(final['accuracy'])} | {100 * final['accuracy'] / teacher:.1f} | "
               f"{percent(final['agreement'])} | {r['synthetic_images']:,} | {r['kd_images']:,} | "
               f"{percent(r.get('loihi', {}).get('accuracy'))} |")
        if args.also:
            row += f" {percent(r['also']['accuracy'])} |"
        print(row)
    print(f"\naccuracy (%) against distillation time on the {args.curve_per_class * 10}-image stratified subset:")
    for r in results:
        if "curve" in r:
            points = ", ".join(f"{p['elapsed_s']:.0f} s: {percent(p['accuracy'])}" for p in r["curve"])
            print(f"- {r['candidate']}: {points}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="cifar_resnet20")
    parser.add_argument("--weights", type=Path, required=True)
    parser.add_argument("--normalization", default="")
    parser.add_argument("--data", type=Path, required=True, help=".npz: the full test set")
    parser.add_argument("--also", type=Path, default=None, help="a second .npz test set")
    parser.add_argument("--budget-s", type=float, default=1200.0)
    parser.add_argument("--snapshot-every-s", type=float, default=240.0)
    parser.add_argument("--curve-per-class", type=int, default=100)
    parser.add_argument("--candidate", action="append", default=[],
                        help="NAME=OPTIONS: extra distill options for one candidate (repeatable)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--no-loihi", action="store_true", help="skip the Loihi export and emulator")
    parser.add_argument("--runs-dir", type=Path, default=Path("runs/quality"))
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args()
    candidates = [c.split("=", 1) if "=" in c else (c, "") for c in (args.candidate or ["default="])]
    results = []
    with tempfile.TemporaryDirectory() as folder:
        subset = write_subset(args.data, args.curve_per_class, Path(folder))
        for name, options in candidates:
            print(f"candidate {name}: {options or '(defaults)'}", file=sys.stderr, flush=True)
            try:
                results.append(run_candidate(name, shlex.split(options), args, subset))
            except (RuntimeError, subprocess.TimeoutExpired) as exc:
                results.append({"candidate": name, "options": options, "error": str(exc)})
            if args.json_out:
                args.json_out.write_text(json.dumps({"machine": os.uname().nodename, "args": vars(args) | {
                    k: str(v) for k, v in vars(args).items() if isinstance(v, Path)}, "results": results},
                    indent=2, default=str))
    print_tables(results, args)


if __name__ == "__main__":
    torch.set_num_threads(max(1, torch.get_num_threads()))
    main()
