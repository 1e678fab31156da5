"""Train and cache the digits teacher that the embedded default distils from.

This is the only place in stars-deploy that sees real training data, and only to make a
teacher for the demo: distillation itself never reads it.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from stars_deploy.data import load_digits_split
from stars_deploy.evaluation import accuracy, predict, teacher_logits_fn
from stars_deploy.fileio import save_torch
from stars_deploy.progress import log
from .spec import Normalizer, TeacherSpec, build_teacher

CACHE_ENV = "STARS_DEPLOY_CACHE"
DIGITS_TEACHER_FILE = "digits_cnn.pt"
DIGITS_ARCH = "digits_cnn"


def cache_dir() -> Path:
    """``$STARS_DEPLOY_CACHE``, else ``$XDG_CACHE_HOME/stars-deploy``, else ``~/.cache/stars-deploy``
    (the XDG base directory convention)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "stars-deploy"


def default_teacher_path() -> Path:
    return cache_dir() / "teachers" / DIGITS_TEACHER_FILE


def train_digits_teacher(path: Path | None = None, epochs: int = 40, seed: int = 0,
                         batch_size: int = 64, lr: float = 3e-3) -> dict:
    """Train the digits BatchNorm CNN on the digits train split and save its state_dict.

    Returns a summary with the held-out test accuracy (fraction) and wall time (s).
    """
    path = Path(path) if path else default_teacher_path()
    start = time.perf_counter()
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    spec = TeacherSpec(arch="digits_cnn")
    normalizer = Normalizer(*spec.mean_std)
    model = build_teacher(spec)
    train, test = load_digits_split("train"), load_digits_split("test")
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=lr, total_steps=epochs * -(-len(train) // batch_size))
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(train), generator=generator)
        for index in order.split(batch_size):
            images = train.images[index]
            # +-1 px shifts: the teacher should not depend on exact placement
            shift = torch.randint(-1, 2, (2,), generator=generator).tolist()
            images = torch.roll(images, shifts=shift, dims=(2, 3))
            loss = F.cross_entropy(model(normalizer(images)), train.labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
    model.eval()
    test_accuracy = accuracy(predict(teacher_logits_fn(model, normalizer), test.images), test.labels)
    save_torch(path, model.state_dict())
    summary = {"path": str(path), "test_accuracy": test_accuracy, "epochs": epochs,
               "train_images": len(train), "wall_time_s": time.perf_counter() - start}
    log(f"trained digits teacher: {test_accuracy:.1%} on held-out digits in "
        f"{summary['wall_time_s']:.1f} s -> {path}")
    return summary


def ensure_default_teacher() -> Path:
    """The cached digits teacher, trained first if missing."""
    path = default_teacher_path()
    if not path.is_file():
        log(f"no cached digits teacher at {path}: training one (a few seconds)")
        train_digits_teacher(path)
    return path


def teacher_weights(spec: TeacherSpec) -> Path | None:
    """The checkpoint a spec's teacher loads: its own, the cached digits teacher for the digits
    architecture without one (trained first if missing), or None (a factory that returns a
    trained module)."""
    if spec.weights:
        return Path(spec.weights)
    return ensure_default_teacher() if spec.arch == DIGITS_ARCH else None
