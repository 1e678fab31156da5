"""Lever c of issue 13: data-free ANN-to-SNN conversion of the teacher itself
(stars_deploy/conversion.py), calibrated on a distillation run's synthetic images only.

    python benchmarks/convert.py --run RUN_DIR --data ../shared/data/cifar10/test_jpeg_q75.npz \
        --timesteps 4 8 16 32 --per-class 100

RUN_DIR is a finished `stars-deploy distill` run: its teacher (manifest) and its synthetic
pool (RUN_DIR/pool/chunk_*.pt, the calibration images; no real image is used for it). The
converted teacher runs on a fixed class-stratified subset of --data (the JPEG file is sorted
by class). It prints, per T: accuracy, agreement with the teacher, and spikes per sample, and
writes them as JSON with --json-out. Say which machine the numbers came from when you quote them.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import stratified_subset  # noqa: E402  (the same subset as the quality curve)

from stars_deploy.converter import pool_images  # noqa: E402
from stars_deploy.conversion import DEFAULT_PERCENTILE, DEFAULT_START, RESETS, ConvertedNetwork  # noqa: E402
from stars_deploy.data import load_eval_data  # noqa: E402
from stars_deploy.distillation import read_run_config  # noqa: E402
from stars_deploy.evaluation import accuracy, predict, teacher_logits_fn  # noqa: E402
from stars_deploy.teachers import Normalizer, load_teacher  # noqa: E402
from stars_deploy.teachers.training import teacher_weights  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--timesteps", type=int, nargs="+", default=[4, 8, 16, 32])
    parser.add_argument("--per-class", type=int, default=100)
    parser.add_argument("--calibration-images", type=int, default=1024)
    parser.add_argument("--percentile", type=float, default=DEFAULT_PERCENTILE)
    parser.add_argument("--reset", choices=RESETS, default=RESETS[0],
                        help="subtract (conversion's usual rule) or zero (what NIR's IF node and Loihi do)")
    parser.add_argument("--start", type=float, default=DEFAULT_START,
                        help="v0 in thresholds: 0.5 (conversion's usual start) or 0 (NIR's IF, Loihi)")
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()

    spec = read_run_config(args.run).teacher
    teacher = load_teacher(spec, teacher_weights(spec))
    normalizer = Normalizer(*spec.mean_std)
    data = load_eval_data(args.data)
    index = torch.from_numpy(stratified_subset(data.images.numpy(), data.labels.numpy(), args.per_class))
    labels = data.labels[index]
    teacher_pred = predict(teacher_logits_fn(teacher, normalizer), data.images[index], batch_size=args.batch_size)
    images = normalizer(data.images[index])
    network = ConvertedNetwork(teacher, args.reset, args.start)
    calibration = pool_images(args.run, args.calibration_images, spec.input_shape)
    thresholds = network.calibrate(calibration, args.percentile)
    rows = [{"timesteps": "ANN", "accuracy": accuracy(teacher_pred, labels), "agreement": 1.0,
             "spikes_per_sample": None, "seconds": 0.0}]
    for steps in args.timesteps:
        begin = time.perf_counter()
        predictions, spikes = [], 0.0
        for start in range(0, len(images), args.batch_size):
            logits, batch_spikes = network.simulate(images[start:start + args.batch_size], steps)
            predictions.append(logits.argmax(1))
            spikes += batch_spikes
        predicted = torch.cat(predictions)
        rows.append({"timesteps": steps, "accuracy": accuracy(predicted, labels),
                     "agreement": accuracy(predicted, teacher_pred),
                     "spikes_per_sample": spikes / len(images), "seconds": time.perf_counter() - begin})
        print(f"T {steps}: {rows[-1]['accuracy']:.1%}", file=sys.stderr, flush=True)
    print(f"teacher {spec.arch} converted ({len(network.sites)} IF sites, reset {args.reset}, v0 {args.start:g} "
          f"threshold), calibrated on {len(calibration)} synthetic images of {args.run.name} (percentile "
          f"{args.percentile:g}); {len(images)} stratified images of {Path(args.data).name}; {platform.machine()} "
          f"CPU, {torch.get_num_threads()} threads")
    print("| T | accuracy % | agreement with teacher % | spikes per sample | seconds |")
    print("|---|---|---|---|---|")
    for row in rows:
        spikes = "-" if row["spikes_per_sample"] is None else f"{row['spikes_per_sample']:,.0f}"
        print(f"| {row['timesteps']} | {100 * row['accuracy']:.1f} | {100 * row['agreement']:.1f} | {spikes} | "
              f"{row['seconds']:.1f} |")
    if args.json_out:
        args.json_out.write_text(json.dumps({"rows": rows, "thresholds": thresholds, "args": {
            k: str(v) for k, v in vars(args).items()}}, indent=1))


if __name__ == "__main__":
    main()
