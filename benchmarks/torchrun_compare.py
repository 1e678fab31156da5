"""The plain `stars-deploy distill` against the same command under torchrun with N processes:
wall time, synthetic and KD images per second, accuracy, and for N = 1 whether the final
weights are the plain run's (bit for bit on the CPU; on a GPU, cuDNN's kernels may differ in
the last bits, so the largest weight difference is printed too). The runs go one after the
other, each alone on the machine.

    python benchmarks/torchrun_compare.py                        # CPU, digits, N = 1 and 2
    python benchmarks/torchrun_compare.py --nproc 1 2 4 --device auto -- --rounds 40 --batch-size 256
Options after `--` go to every `distill` command (default: --rounds 10 --no-eval).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

DEFAULT_DISTILL = ["--rounds", "10", "--no-eval"]


def run(launcher: list[str], distill: list[str], runs_dir: Path, name: str, device: str) -> dict:
    command = [*launcher, "-m", "stars_deploy", "distill", *distill, "--device", device, "--runs-dir", str(runs_dir),
               "--name", name, "--json", "--quiet"]
    begin = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ))
    if done.returncode != 0:
        sys.exit(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    summary = json.loads(done.stdout)
    summary["process_wall_s"] = time.perf_counter() - begin
    return summary


def weights(run_dir: Path) -> dict:
    return torch.load(run_dir / "student.pt", weights_only=True)["state_dict"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nproc", type=int, nargs="+", default=[1, 2], help="Process counts under torchrun.")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", action="store_true")
    args, distill = parser.parse_known_args()
    distill = [a for a in distill if a != "--"] or DEFAULT_DISTILL
    rows = []
    with tempfile.TemporaryDirectory() as runs:
        runs_dir = Path(runs)
        rows.append({"launch": "plain", **run([sys.executable], distill, runs_dir, "plain", args.device)})
        reference = weights(runs_dir / "plain")
        for n in args.nproc:
            torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n)]
            row = {"launch": f"torchrun x{n}", **run(torchrun, distill, runs_dir, f"torchrun{n}", args.device)}
            if n == 1:
                other = weights(runs_dir / "torchrun1")
                row["identical_to_plain"] = all(torch.equal(reference[k], other[k]) for k in reference)
                row["max_abs_weight_diff"] = max(float((reference[k].float() - other[k].float()).abs().max())
                                                 for k in reference if reference[k].numel())
            rows.append(row)
    if args.json:
        print(json.dumps(rows, default=str))
        return
    print("| launch | device | rounds | synthetic images | distill s | synthetic img/s | KD img/s | student acc | "
          "N=1 identical (max diff) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        same = f"{r['identical_to_plain']} ({r['max_abs_weight_diff']:.1e})" if "identical_to_plain" in r else ""
        accuracy = f"{r['student_accuracy']:.3f}" if "student_accuracy" in r else "n/a"
        print(f"| {r['launch']} | {r['device']} | {r['rounds']} | {r['synthetic_images']} | {r['distill_time_s']:.1f} "
              f"| {r['synthesis_images_per_s']:.0f} | {r['kd_images_per_s']:.0f} | {accuracy} | {same} |")


if __name__ == "__main__":
    main()
