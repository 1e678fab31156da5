"""CIFAR-10 end to end with the Python API, from a local teacher checkpoint and local test
images (nothing is downloaded):

    python examples/cifar10.py --teacher-weights resnet20.th --test-data test.npz --budget-s 1200

The teacher is an akamaster-style CIFAR ResNet (``--teacher cifar_resnet20`` by default;
cifar_resnet32/44/56 too), ImageNet normalisation as that checkpoint was trained with; the
test data is a .npz with ``images`` (N, 32, 32, 3) uint8 and ``labels`` (N,), or a CIFAR-10
python folder. Everything else is the default for a CIFAR-sized teacher (the twin route, see
the README's "Expected results"): the student is the Loihi-deployable spiking convnet. It is
exported to NIR and Loihi, run on the bit-accurate emulator, gated and reported. The budget
bounds the distillation; use --device cuda where there is a GPU.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import stars_deploy as sd
from stars_deploy.errors import StarsDeployError


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher-weights", type=Path, required=True)
    parser.add_argument("--teacher", default="cifar_resnet20")
    parser.add_argument("--normalization", default="imagenet")
    parser.add_argument("--test-data", required=True, help=".npz or CIFAR-10 python folder")
    parser.add_argument("--budget-s", type=float, default=1200.0)
    parser.add_argument("--samples", type=int, default=None, help="test images for the Loihi emulator (all)")
    parser.add_argument("--min-accuracy", type=float, default=0.0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--runs-dir", type=Path, default=Path("runs"))
    args = parser.parse_args()
    try:
        run = sd.distill(args.teacher, weights=args.teacher_weights, normalization=args.normalization,
                         data=args.test_data, budget_s=args.budget_s, device=args.device, runs_dir=args.runs_dir)
        print(f"teacher {run['teacher_accuracy']:.1%}, student {run['student_accuracy']:.1%}, "
              f"agreement {run['agreement']:.1%} after {run['wall_time_s']:.0f} s")
        for target in ("nir", "loihi"):
            sd.export(run["run_dir"], target)
        result = sd.check(run["run_dir"], "loihi", samples=args.samples, device=args.device,
                          min_accuracy=args.min_accuracy, max_accuracy_drop=0.02)
        for gate in result["gates"]:
            print(f"{gate['gate']:20s} {gate['measured']:.4f} {gate['comparison']} {gate['limit']}: "
                  f"{'pass' if gate['passed'] else 'FAIL'}")
        print("report:", sd.report(run["run_dir"], samples=args.samples, device=args.device)["report"])
        return 0 if result["passed"] else 1
    except StarsDeployError as exc:
        print(f"cifar10 example: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
