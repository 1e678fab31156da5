"""Accuracy and agreement of teachers and students on evaluation data."""

from __future__ import annotations

from typing import Callable

import torch

from .data import EvalData
from .errors import DataError

EVAL_BATCH = 500


@torch.no_grad()
def predict(logits_fn: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor,
            device: torch.device | str = "cpu", batch_size: int = EVAL_BATCH) -> torch.Tensor:
    """Class predictions (N,) of ``logits_fn`` over images in [0, 1], batch by batch."""
    predictions = [logits_fn(images[start:start + batch_size].to(device)).argmax(1).cpu()
                   for start in range(0, len(images), batch_size)]
    return torch.cat(predictions) if predictions else torch.zeros(0, dtype=torch.long)


def accuracy(predictions: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of predictions equal to labels, in [0, 1]. Zero images have no accuracy (a NaN
    would pass for a number downstream), so they are refused: data.py already refuses empty data."""
    if len(labels) == 0:
        raise DataError("no images to score: the evaluation data is empty; give at least one image")
    if len(predictions) != len(labels):
        raise DataError(f"{len(predictions)} predictions for {len(labels)} labels: the evaluation data is inconsistent")
    return float((predictions == labels).float().mean())


def teacher_logits_fn(teacher, normalizer):
    """[0, 1] images -> teacher logits."""
    return lambda images: teacher(normalizer(images))


def student_logits_fn(student, normalizer):
    """[0, 1] images -> student logits (mean over T); the student must be in eval mode."""
    return lambda images: student(normalizer(images)).logits


def evaluate_pair(student, teacher_predictions: torch.Tensor, normalizer, data: EvalData,
                  device) -> dict[str, float]:
    """Student accuracy and its agreement with the teacher's predictions on ``data``."""
    was_training = student.training
    student.eval()
    predictions = predict(student_logits_fn(student, normalizer), data.images, device)
    student.train(was_training)
    return {"student_accuracy": accuracy(predictions, data.labels),
            "agreement": accuracy(predictions, teacher_predictions)}
