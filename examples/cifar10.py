"""CIFAR-10 end to end with the Python API, from a local teacher checkpoint and local test
images (nothing is downloaded):

    python examples/cifar10.py --teacher-weights resnet20.th --test-data test.npz --budget-s 480

The teacher is an akamaster-style CIFAR ResNet (``--teacher-arch cifar_resnet20`` by default,
ImageNet normalisation as that checkpoint was trained with); the test data is a .npz with
``images`` (N, 32, 32, 3) uint8 and ``labels`` (N,) or a CIFAR-10 python pickle folder. The
student is the Loihi-deployable spiking convnet; it is exported to NIR and Loihi, run on the
emulator and gated. The budget is checked between rounds, and one round at the default batch
takes minutes on a CPU: there use --batch-size 32; use --device cuda where there is a GPU.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from stars_deploy.distill import distill, make_config
from stars_deploy.errors import StarsDeployError
from stars_deploy.exporters.registry import export_run
from stars_deploy.targets.check import check
from stars_deploy.targets.report import write_report
from stars_deploy.teachers import TeacherSpec


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher-weights", type=Path, required=True)
    parser.add_argument("--teacher-arch", default="cifar_resnet20")
    parser.add_argument("--normalization", default="imagenet")
    parser.add_argument("--test-data", required=True, help=".npz or CIFAR-10 pickle folder")
    parser.add_argument("--budget-s", type=float, default=120.0)
    parser.add_argument("--objective", default="stars", choices=["host", "stars"])
    parser.add_argument("--synthesizer", default="pixel", choices=["pixel", "generator"])
    parser.add_argument("--batch-size", type=int, default=256, help="synthetic and KD batch (32 on a CPU)")
    parser.add_argument("--samples", type=int, default=500, help="test images for the Loihi emulator")
    parser.add_argument("--min-accuracy", type=float, default=0.0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--runs-dir", type=Path, default=Path("runs"))
    args = parser.parse_args()
    try:
        config = make_config(
            args.objective,
            teacher=TeacherSpec(arch=args.teacher_arch, weights=str(args.teacher_weights),
                                normalization=args.normalization),
            student={"family": "convnet", "width": 32, "depth": 5},
            synthesis={"batch_size": args.batch_size, "method": args.synthesizer},
            budget_s=args.budget_s, rounds=None, kd_steps=50, kd_batch_size=args.batch_size,
            eval_data=args.test_data, eval_every=10, device=args.device)
        summary = distill(config, runs_dir=args.runs_dir)
        run_dir = Path(summary["run_dir"])
        print(f"teacher {summary['teacher_accuracy']:.1%}, student {summary['student_accuracy']:.1%}, "
              f"agreement {summary['agreement']:.1%} after {summary['wall_time_s']:.0f} s")
        for target in ("nir", "loihi"):
            export_run(run_dir, target)
        result = check(run_dir, "loihi", {"min_accuracy": args.min_accuracy, "max_accuracy_drop": 0.02},
                       data=args.test_data, samples=args.samples)
        for gate in result["gates"]:
            print(f"{gate['gate']:20s} {gate['measured']:.4f} {gate['comparison']} {gate['limit']}: "
                  f"{'pass' if gate['passed'] else 'FAIL'}")
        print("report:", write_report(run_dir, data=args.test_data, samples=args.samples)["report"])
        return 0 if result["passed"] else 1
    except StarsDeployError as exc:
        print(f"cifar10 example: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
