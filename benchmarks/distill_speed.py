"""Distillation throughput: synthesis iterations per second, KD images per second and peak
memory, for several variants side by side, on the CPU or CUDA. Each variant is a short
real distillation through the public API (stars_deploy.distillation) with a round budget.

    python benchmarks/distill_speed.py                       # digits default, CPU
    python benchmarks/distill_speed.py --teacher-arch cifar_resnet20 \\
        --teacher-weights ../shared/data/cifar10/resnet20_teacher.th --student resnet --depth 20 \\
        --width 16 --batch-sizes 256 1024 --device cuda
"""

from __future__ import annotations

import argparse
import collections
import json
import resource
import tempfile
import warnings
from pathlib import Path

import torch

from stars_deploy.devices import resolve_device
from stars_deploy.distillation import distill, make_config
from stars_deploy.progress import set_quiet
from stars_deploy.teachers import TeacherSpec

VARIANTS = {  # name -> (objective, synthesis overrides, distill overrides); each adds one change
    "host, Norse LIF": ("host", {}, {"lif_kernel": "norse"}),
    "host, fused LIF": ("host", {}, {"lif_kernel": "fused"}),
    "host": ("host", {}, {"lif_kernel": "compiled"}),  # auto on CUDA
    "host + bf16 teacher": ("host", {"teacher_bf16": True}, {}),
    "host + bf16 + channels_last": ("host", {"teacher_bf16": True}, {"channels_last": True}),
    "host + compiled synthesis": ("host", {"compile": "default"}, {}),
    "host + compiled synthesis + CUDA graphs": ("host", {"compile": "reduce-overhead"}, {}),
    "stars (student every 10)": ("stars", {"student_every": 10}, {}),
    "stars + compiled synthesis": ("stars", {"student_every": 10, "compile": "default"}, {}),
    "stars (student every step)": ("stars", {"student_every": 1}, {}),
    "generator host": ("host", {"method": "generator"}, {}),
    "generator stars": ("stars", {"method": "generator"}, {}),
}
DEFAULT_VARIANTS = ["host, Norse LIF", "host, fused LIF", "host", "stars (student every 10)", "generator host"]


def measure(args, variant: str, batch_size: int, runs_dir: Path) -> dict:
    objective, synthesis, options = VARIANTS[variant]
    steps = args.synthesis_steps if synthesis.get("method") != "generator" else args.generator_steps
    device = resolve_device(args.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    config = make_config(
        objective, teacher=TeacherSpec(arch=args.teacher_arch, weights=args.teacher_weights),
        student={"family": args.student, "width": args.width, "depth": args.depth, "timesteps": args.timesteps},
        synthesis={"batch_size": batch_size, "steps": steps, **synthesis},
        rounds=args.rounds, budget_s=None, kd_steps=args.kd_steps, kd_batch_size=batch_size,
        eval_data=None, device=args.device, checkpoint_every=10**6, **options)
    summary = distill(config, runs_dir=runs_dir)
    timings = summary["timings_s"]
    peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"variant": variant, "batch_size": batch_size, "device": summary["device"],
            "synthesis_iterations_per_s": summary["rounds"] * steps / timings["synthesis_s"],
            "synthetic_images_per_s": summary["synthesis_images_per_s"],
            "kd_images_per_s": summary["kd_images_per_s"],
            "peak_memory_mib": peak / 2**20}


def sync_report(args, variant: str, batch_size: int, runs_dir: Path) -> list[tuple[str, int]]:
    """Where one round of ``variant`` waits for the GPU: torch's sync debug mode warns at every
    synchronising CUDA call; counted by the Python line that made it (CUDA only)."""
    sites: collections.Counter = collections.Counter()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            measure(argparse.Namespace(**{**vars(args), "rounds": 1}), variant, batch_size, runs_dir)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for warning in caught:
        if "synchronizing" in str(warning.message):
            sites[f"{Path(warning.filename).name}:{warning.lineno}"] += 1
    return sites.most_common()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher-arch", default="digits_cnn")
    parser.add_argument("--teacher-weights", default=None)
    parser.add_argument("--student", default="convnet")
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--depth", type=int, default=None)
    parser.add_argument("--timesteps", type=int, default=4)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[128])
    parser.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, choices=list(VARIANTS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--synthesis-steps", type=int, default=20)
    parser.add_argument("--generator-steps", type=int, default=5)
    parser.add_argument("--kd-steps", type=int, default=10)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--sync-report", action="store_true",
                        help="CUDA: after the table, count the host-device synchronisations of one round per variant")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    set_quiet(True)
    device = resolve_device(args.device)
    memory_kind = "cuda max allocated" if device.type == "cuda" else "process max RSS (cumulative)"
    if not args.json:  # rows are printed as they finish, so a run cut short keeps what it measured
        print(f"| variant | batch | device | synthesis it/s | synthetic img/s | KD img/s | peak memory MiB ({memory_kind}) |")
        print("|---|---|---|---|---|---|---|", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as runs_dir:
        if device.type == "cuda" or "host" in args.variants:  # CUDA context, cuDNN autotuning, compiling
            warm = "host" if "host" in args.variants else args.variants[0]  # the LIF kernels: not measured
            measure(argparse.Namespace(**{**vars(args), "rounds": 1}), warm, args.batch_sizes[0], Path(runs_dir))
        for batch_size in args.batch_sizes:
            for variant in args.variants:
                if VARIANTS[variant][1].get("compile", "none") != "none":  # compile its objective: not measured
                    measure(argparse.Namespace(**{**vars(args), "rounds": 1}), variant, batch_size, Path(runs_dir))
                r = measure(args, variant, batch_size, Path(runs_dir))
                rows.append(r)
                if not args.json:
                    print(f"| {r['variant']} | {r['batch_size']} | {r['device']} | {r['synthesis_iterations_per_s']:.1f} "
                          f"| {r['synthetic_images_per_s']:.0f} | {r['kd_images_per_s']:.0f} | {r['peak_memory_mib']:.0f} |",
                          flush=True)
        if args.sync_report and device.type == "cuda":
            for variant in args.variants:
                sites = sync_report(args, variant, args.batch_sizes[0], Path(runs_dir))
                if args.json:
                    rows.append({"variant": variant, "sync_sites_one_round": dict(sites)})
                else:
                    listed = ", ".join(f"{site} x{count}" for site, count in sites) or "none"
                    print(f"\nsyncs of {variant}, one round with set-up and final checkpoint: "
                          f"{sum(c for _, c in sites)}: {listed}", flush=True)
    if args.json:
        print(json.dumps(rows))

if __name__ == "__main__":
    main()
