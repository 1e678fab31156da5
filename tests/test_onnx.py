"""ONNX: the student unrolled over T (static) and the teacher, run by onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime
import torch

from stars_deploy.exporters.onnx_export import student_onnx_bytes, teacher_onnx_bytes
from stars_deploy.students.folding import fold_student
from stars_deploy.teachers import Normalizer, TeacherSpec, build_teacher

ONNX_TOLERANCE = 1e-5


def run_onnx(model_bytes: bytes, images: torch.Tensor) -> list[np.ndarray]:
    onnx.checker.check_model(onnx.load_from_string(model_bytes))
    session = onnxruntime.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    return session.run(None, {"images": images.numpy()})


def test_student_and_teacher_onnx_match_pytorch(random_student, randomize_bn):
    normalizer = Normalizer((0.5,), (0.25,))
    student = random_student("resnet", timesteps=4)
    images = torch.rand(7, 1, 8, 8)  # a batch size other than the export example's
    logits, logits_t = run_onnx(student_onnx_bytes(student, normalizer), images)
    with torch.no_grad():
        expected = fold_student(student)(normalizer(images))
        unfolded = student(normalizer(images))
    assert logits_t.shape == (4, 7, 10)
    np.testing.assert_allclose(logits, expected.logits.numpy(), atol=ONNX_TOLERANCE, rtol=0)
    np.testing.assert_allclose(logits_t, expected.logits_t.numpy(), atol=ONNX_TOLERANCE, rtol=0)
    np.testing.assert_allclose(logits, unfolded.logits.numpy(), atol=1e-3, rtol=0)

    teacher = randomize_bn(build_teacher(TeacherSpec()))  # weights need not be trained here
    (teacher_logits,) = run_onnx(teacher_onnx_bytes(teacher, normalizer, (1, 8, 8)), images)
    with torch.no_grad():
        np.testing.assert_allclose(teacher_logits, teacher(normalizer(images)).numpy(), atol=ONNX_TOLERANCE, rtol=0)
