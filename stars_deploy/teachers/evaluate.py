"""Teacher evaluation, the library function behind `stars-deploy teacher eval`."""

from __future__ import annotations

from stars_deploy.data import check_fits, load_eval_data
from stars_deploy.devices import resolve_device
from stars_deploy.evaluation import accuracy, predict, teacher_logits_fn
from .training import teacher_weights
from .spec import Normalizer, TeacherSpec, load_teacher


def evaluate_teacher(spec: TeacherSpec, data: str = "digits", samples: int | None = None,
                     device: str = "auto") -> dict:
    """Accuracy (fraction) of the teacher described by ``spec`` on ``data``."""
    target = resolve_device(device)
    weights = teacher_weights(spec)
    model = load_teacher(spec, weights).to(target)
    eval_set = load_eval_data(data).subset(samples)
    check_fits(eval_set, spec.input_shape, spec.num_classes, f"teacher {spec.arch}")
    normalizer = Normalizer(*spec.mean_std).to(target)
    predictions = predict(teacher_logits_fn(model, normalizer), eval_set.images, target)
    return {"teacher": spec.arch, "weights": str(weights), "data": eval_set.name, "images": len(eval_set),
            "accuracy": accuracy(predictions, eval_set.labels)}
