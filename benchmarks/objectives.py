"""Host vs host + STARS on the embedded default (digits teacher -> spiking convnet).

Each objective runs over several seeds twice: at the same wall-clock budget and at the same
number of rounds. Prints student accuracy and agreement (mean and sample standard deviation
over seeds) as a table; --json prints every run instead.

    python benchmarks/objectives.py [--budget-s 90] [--rounds 60] [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from stars_deploy.distillation import distill, make_config
from stars_deploy.progress import set_quiet


def run(objective: str, seed: int, runs_dir: Path, mode: str, **budget) -> dict:
    config = make_config(objective, seed=seed, eval_every=10**6, **budget)
    summary = distill(config, runs_dir=runs_dir)
    return {"objective": objective, "seed": seed, "mode": mode,
            **{k: summary[k] for k in ("student_accuracy", "agreement", "rounds", "synthetic_images",
                                       "distill_time_s", "teacher_accuracy")}}


def spread(values: list[float]) -> str:
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * mean:5.1f} ± {100 * std:3.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--objectives", nargs="+", default=["host", "stars"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--budget-s", type=float, default=90.0)
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--only", choices=["wall", "rounds"], default=None,
                        help="Run one of the two comparisons (default: both).")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    set_quiet(True)
    results = []
    with tempfile.TemporaryDirectory() as runs_dir:
        budgets = {"wall": {"budget_s": args.budget_s, "rounds": None},
                   "rounds": {"rounds": args.rounds, "budget_s": None}}
        for mode, budget in budgets.items():
            if args.only and mode != args.only:
                continue
            for objective in args.objectives:
                for seed in args.seeds:
                    results.append(run(objective, seed, Path(runs_dir), mode, **budget))
                    if not args.json:
                        r = results[-1]
                        print(f"  {objective:6s} seed {seed}  {r['rounds']:4d} rounds {r['distill_time_s']:6.1f} s  "
                              f"student {100 * r['student_accuracy']:.1f} %", flush=True)
    if args.json:
        print(json.dumps(results))
        return
    print(f"\n| budget | objective | student accuracy % (mean ± sd, {len(args.seeds)} seeds) "
          "| agreement % | rounds | synthetic images | distill time s |")
    print("|---|---|---|---|---|---|---|")
    for mode, label in (("wall", f"same wall clock ({args.budget_s:g} s)"), ("rounds", f"same rounds ({args.rounds})")):
        for objective in args.objectives:
            rows = [r for r in results if r["objective"] == objective and r["mode"] == mode]
            if not rows:
                continue
            print(f"| {label} | {objective} "
                  f"| {spread([r['student_accuracy'] for r in rows])} | {spread([r['agreement'] for r in rows])} "
                  f"| {statistics.fmean(r['rounds'] for r in rows):.0f} "
                  f"| {statistics.fmean(r['synthetic_images'] for r in rows):,.0f} "
                  f"| {statistics.fmean(r['distill_time_s'] for r in rows):.0f} |")
    print(f"\nteacher accuracy: {100 * results[0]['teacher_accuracy']:.1f} % on the held-out digits")


if __name__ == "__main__":
    main()
