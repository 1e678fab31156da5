"""The real case: distil a spiking student from a CIFAR-10 teacher checkpoint, no data.

Uses the library's public API (stars_deploy.distillation). Paths are arguments; nothing is
downloaded. With the shared data of this project, for example:

    python benchmarks/cifar10.py --teacher-weights ../shared/data/cifar10/resnet20_teacher.th \\
        --eval-data ../shared/data/cifar10/test_jpeg_q75.npz --objective stars --budget-s 480 --device cuda

Judge a student on the JPEG test set against the teacher's accuracy on the same images
(81.0 % for the shared ResNet-20), and by its agreement with the teacher.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from stars_deploy.data import load_eval_data
from stars_deploy.devices import resolve_device
from stars_deploy.distillation import distill, make_config
from stars_deploy.errors import StarsDeployError
from stars_deploy.evaluation import accuracy, predict, student_logits_fn, teacher_logits_fn
from stars_deploy.fileio import read_json
from stars_deploy.progress import set_quiet
from stars_deploy.layout import DISTILL, STUDENT
from stars_deploy.students import load_student
from stars_deploy.teachers import Normalizer, TeacherSpec, load_teacher


def also_eval(config, run_dir: Path, path: Path) -> dict:
    """Teacher and final student accuracy, and their agreement, on a second test set."""
    data = load_eval_data(str(path))
    device = resolve_device(config.device)
    normalizer = Normalizer(*config.teacher.mean_std).to(device)
    teacher = load_teacher(config.teacher, Path(config.teacher.weights)).to(device)
    student = load_student(run_dir / STUDENT).to(device)
    teacher_predictions = predict(teacher_logits_fn(teacher, normalizer), data.images, device)
    student_predictions = predict(student_logits_fn(student, normalizer), data.images, device)
    return {"also_eval": {"data": data.name, "images": len(data),
                          "teacher_accuracy": accuracy(teacher_predictions, data.labels),
                          "student_accuracy": accuracy(student_predictions, data.labels),
                          "agreement": accuracy(student_predictions, teacher_predictions)}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher-arch", default="cifar_resnet20")
    parser.add_argument("--teacher-weights", required=True, type=Path)
    parser.add_argument("--normalization", default="imagenet")
    parser.add_argument("--eval-data", default=None, help=".npz (images N,H,W,C uint8, labels) or CIFAR folder")
    parser.add_argument("--student", default="convnet", choices=["convnet", "resnet"])
    parser.add_argument("--width", type=int, default=None, help="[32 convnet, 16 resnet]")
    parser.add_argument("--depth", type=int, default=None, help="[5 convnet, 20 resnet]")
    parser.add_argument("--timesteps", type=int, default=4)
    parser.add_argument("--objective", default="host", choices=["host", "rca", "tar", "stars"])
    parser.add_argument("--strategy", default="auto", choices=["auto", "direct", "twin"],
                        help="auto: the twin route for a convnet student of a >= 32 px teacher")
    parser.add_argument("--budget-s", type=float, default=480.0)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--synthesizer", default="pixel", choices=["pixel", "generator"])
    parser.add_argument("--synthesis-steps", type=int, default=None, help="[200 pixel, 5 generator]")
    parser.add_argument("--teacher-bf16", action="store_true")
    parser.add_argument("--bn-groups", type=int, default=1, help="the batch as G independent BN-matched batches")
    parser.add_argument("--generator-meta", default="reptile", choices=["reptile", "fomaml"])
    parser.add_argument("--bn-momentum", type=float, default=0.0, help="FastDFKD's BN statistics history")
    parser.add_argument("--compile-synthesis", default="none", choices=["none", "default", "reduce-overhead"],
                        help="torch.compile the teacher side of the synthesis objective")
    parser.add_argument("--kd-steps", type=int, default=100)
    parser.add_argument("--kd-batch-size", type=int, default=256)
    parser.add_argument("--eval-every", type=int, default=None, help="rounds [5 pixel, 50 generator]")
    parser.add_argument("--also-eval", type=Path, default=None,
                        help="a second .npz to score teacher and final student on (e.g. test_lossless_200.npz)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pool-memory-mb", type=float, default=8192.0,
                        help="synthetic images kept on the device before spilling to disk")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--runs-dir", type=Path, default=None, help="keep the run here [a temporary folder]")
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    args = parser.parse_args()
    set_quiet(args.json)
    width = args.width or (32 if args.student == "convnet" else 16)
    depth = args.depth or (5 if args.student == "convnet" else 20)
    try:
        config = make_config(
            args.objective,
            teacher=TeacherSpec(arch=args.teacher_arch, weights=str(args.teacher_weights),
                                normalization=args.normalization),
            student={"family": args.student, "width": width, "depth": depth, "timesteps": args.timesteps},
            synthesis={"batch_size": args.batch_size, "method": args.synthesizer, "teacher_bf16": args.teacher_bf16,
                       "bn_groups": args.bn_groups, "compile": args.compile_synthesis,
                       "generator_meta": args.generator_meta, "bn_momentum": args.bn_momentum,
                       "steps": args.synthesis_steps or (200 if args.synthesizer == "pixel" else None)},
            budget_s=args.budget_s, rounds=None, kd_steps=args.kd_steps, kd_batch_size=args.kd_batch_size,
            eval_data=args.eval_data, eval_every=args.eval_every or (5 if args.synthesizer == "pixel" else 50),
            seed=args.seed, device=args.device, pool_memory_mb=args.pool_memory_mb, strategy=args.strategy)
        with tempfile.TemporaryDirectory() as scratch:
            summary = distill(config, runs_dir=args.runs_dir or Path(scratch))
            summary["history"] = read_json(Path(summary["run_dir"]) / DISTILL, "distill record")["history"]
            if args.also_eval:
                summary.update(also_eval(config, Path(summary["run_dir"]), args.also_eval))
    except StarsDeployError as exc:
        print(f"cifar10 benchmark: error: {exc}", file=sys.stderr)
        sys.exit(2)
    result = {"teacher": args.teacher_arch, "student": f"{args.student}{depth}-w{width}-T{args.timesteps}",
              "objective": args.objective, "synthesizer": args.synthesizer, "budget_s": args.budget_s,
              "synthesis": config.synthesis.to_dict(), "kd_steps": args.kd_steps, "kd_batch_size": args.kd_batch_size,
              "history": [{k: h[k] for k in ("round", "elapsed_s", "student_accuracy", "agreement")}
                          for h in summary.get("history", []) if "student_accuracy" in h],
              **{k: summary.get(k) for k in ("teacher_accuracy", "student_accuracy", "agreement", "synthetic_images",
                                             "wall_time_s", "distill_time_s", "rounds", "device",
                                             "synthesis_images_per_s", "kd_images_per_s", "eval_data",
                                             "also_eval")}}
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:24s} {value:.4f}" if isinstance(value, float) else f"{key:24s} {value}")


if __name__ == "__main__":
    main()
