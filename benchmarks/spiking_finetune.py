"""Lever b of issue 13, measured offline: a finished twin-route student fine-tuned briefly as a
spiking network (KD from its teacher on its run's own synthetic pool, with the KD phase's
augmentation and mixing), scored before and after on evaluation data.

    python benchmarks/spiking_finetune.py --run RUN_DIR --data ../shared/data/cifar10/test_jpeg_q75.npz \
        --steps 50 --lr 2e-5

RUN_DIR is a finished `stars-deploy distill` run (its manifest names the teacher; its pool holds
the images). Nothing of the run is changed. This is what `--spiking-fraction` does at the end of
a twin run (there: SPIKING_STEPS_PER_ROUND steps a round until the budget ends). Prints one JSON
line; say which machine the numbers came from when you quote them.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from stars_deploy.converter import pool_images
from stars_deploy.data import load_eval_data
from stars_deploy.distillation import read_run_config
from stars_deploy.distillation.augment import mix_batch, train_augment
from stars_deploy.distillation.objectives import kd_loss
from stars_deploy.evaluation import accuracy, predict, student_logits_fn
from stars_deploy.layout import STUDENT
from stars_deploy.students import load_student
from stars_deploy.teachers import Normalizer, load_teacher
from stars_deploy.teachers.training import teacher_weights


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    config = read_run_config(args.run)
    spec = config.teacher
    teacher = load_teacher(spec, teacher_weights(spec))
    normalizer = Normalizer(*spec.mean_std)
    pool = pool_images(args.run, 10**9, spec.input_shape)  # the whole pool
    student = load_student(args.run / STUDENT)
    data = load_eval_data(args.data)
    low = normalizer.bounds()[0]

    def score() -> float:
        student.eval()
        with torch.no_grad():
            predictions = predict(student_logits_fn(student, normalizer), data.images)
        student.train()
        return accuracy(predictions, data.labels)

    before = score()
    optimizer = torch.optim.Adam(student.parameters(), lr=args.lr)
    start = time.perf_counter()
    for _ in range(args.steps):
        batch = pool[torch.randint(len(pool), (args.batch_size,))]
        batch = mix_batch(train_augment(batch, low, spec.flips), config.kd_mix)
        with torch.no_grad():
            target = teacher(batch)
        loss = kd_loss(student(batch).logits, target, config.kd_temperature)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    train_s = time.perf_counter() - start
    print(json.dumps({"run": str(args.run), "data": data.name, "images": len(data), "steps": args.steps,
                      "lr": args.lr, "batch_size": args.batch_size, "train_s": round(train_s, 1),
                      "before": before, "after": score(), "machine": platform.processor() or platform.machine(),
                      "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
