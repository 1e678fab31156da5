"""The Loihi emulator against Lava's own fixed-point simulator on the same digits samples, in
one run: both wall times, their ratio, and spike mismatches per layer (expected: 0).

    python benchmarks/loihi_vs_lava.py [RUN_DIR | FILE.net] [--samples 100] [--json]

Without a path it uses the latest run in ./runs (exporting student.net if needed). Lava runs
the samples one after the other in one network, in one run (build, compile and start-up
included in its time; recording is written to files from inside Lava, read-back shown apart); the emulator runs them as one batch on --device (a warm-up call, then the best of 5
runs; the median is reported too).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from stars_deploy.data import load_eval_data
from stars_deploy.progress import set_quiet
from stars_deploy.runs import latest_run
from stars_deploy.targets.lava_sim import load_lava
from stars_deploy.targets.loihi import load_emulator
from stars_deploy.targets.record import spike_mismatches
from stars_deploy.targets.simulate import model_inputs

EMULATOR_REPEATS = 5  # the emulator takes milliseconds: its best time of 5; Lava runs once


def net_file(path: Path | None) -> Path:
    if path is not None and path.is_file():
        return path
    run_dir = path or latest_run(Path("runs"))
    target = run_dir / "export" / "student.net"
    if not target.is_file():
        from stars_deploy.exporters.registry import export_run

        export_run(run_dir, "loihi")
    return target


def measure(path: Path, samples: int, device: str) -> dict:
    emulator = load_emulator(path, device=device)
    data = load_eval_data("digits").subset(samples)
    images = model_inputs(emulator.metadata, data.images)
    emulator.run(images[:2])  # warm-up (allocations, kernels)
    times = []
    for _ in range(EMULATOR_REPEATS):
        start = time.perf_counter()
        emulated = emulator.run(images)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    emulator_s, emulator_median_s = min(times), sorted(times)[len(times) // 2]
    emulated = emulated.cpu()
    start = time.perf_counter()
    simulated = load_lava(path).run(images)
    lava_s = time.perf_counter() - start
    per_layer = spike_mismatches(simulated, emulated)
    steps = simulated.timings_s["steps_per_sample"]
    return {"file": str(path), "samples": len(images), "steps_per_sample": steps, "device": device,
            "emulator_s": emulator_s, "emulator_median_s": emulator_median_s, "lava_s": lava_s, "lava_read_s": simulated.timings_s["read_s"],
            "lava_ms_per_step": 1e3 * simulated.timings_s["run_s"] / (len(images) * steps),
            "speedup": lava_s / emulator_s, "speedup_median": lava_s / emulator_median_s,
            "agreement": float((emulated.predictions == simulated.predictions).float().mean()),
            "spike_mismatches": sum(per_layer.values()), "spike_mismatches_per_layer": per_layer,
            "logits_identical": bool(torch.equal(emulated.logits_t, simulated.logits_t)),
            "spikes_compared": int(sum(s.numel() for s in emulated.spikes.values())),
            "accuracy": float((emulated.predictions == data.labels).float().mean())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("path", nargs="?", type=Path, default=None)
    parser.add_argument("--samples", type=int, default=100)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    set_quiet(True)
    result = measure(net_file(args.path), args.samples, args.device)
    if args.json:
        print(json.dumps(result, sort_keys=True))
        return
    rows = [("file", result["file"]), ("samples x steps", f"{result['samples']} x {result['steps_per_sample']}"),
            (f"emulator ({result['device']})", f"{result['emulator_s']:.4f} s (best of {EMULATOR_REPEATS}; "
                                               f"median {result['emulator_median_s']:.4f} s)"),
            ("Lava fixed_pt (CPU)", f"{result['lava_s']:.2f} s (build+run {result['lava_ms_per_step']:.1f} ms/step, "
                                    f"read-back {result['lava_read_s']:.2f} s)"),
            ("speed-up", f"{result['speedup']:,.0f}x (against the median: {result['speedup_median']:,.0f}x)"),
            ("agreement", f"{100 * result['agreement']:.1f} %"),
            ("spike mismatches", f"{result['spike_mismatches']} of {result['spikes_compared']:,} "
                                 f"{result['spike_mismatches_per_layer']}"),
            ("logits identical", str(result["logits_identical"])),
            ("accuracy (fixed point)", f"{100 * result['accuracy']:.1f} %")]
    width = max(len(label) for label, _ in rows)
    for label, value in rows:
        print(f"{label:<{width}}  {value}")


if __name__ == "__main__":
    main()
