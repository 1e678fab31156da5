"""Student (unrolled over its T steps, static T) and teacher -> single-file ONNX models.

Both models take ``images``: (B, C, H, W) float32 in [0, 1] with a dynamic batch, and apply
the teacher's normalisation inside, so onnxruntime needs nothing else. The student model
returns ``logits`` (B, K) = mean over T of ``logits_t`` (T, B, K); the teacher ``logits``.
The student is exported with BatchNorm folded (the same weights as the NIR file).
Uses torch's dynamo exporter (needs onnxscript), ``external_data=False`` for one file.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import torch
from torch import nn

from stars_deploy.distillation.config import read_run_config
from stars_deploy.errors import StarsDeployError
from stars_deploy.fileio import write_bytes
from stars_deploy.layout import STUDENT, export_dir
from stars_deploy.progress import log
from stars_deploy.students import fold_student, load_student
from stars_deploy.teachers import Normalizer, load_teacher
from stars_deploy.teachers.training import teacher_weights

from .layers import LayerTable
from .nir_export import describe_student, student_record
from .records import merge_record
from .registry import ExportOptions, export_kind

OPSET = 18
TEACHER_FILE = "teacher.onnx"


class ONNXExportError(StarsDeployError):
    """torch.onnx could not export a model."""


class UnrolledStudent(nn.Module):
    """[0, 1] images -> (logits, logits_t) with the T-step loop unrolled at export."""

    def __init__(self, student: nn.Module, normalizer: Normalizer):
        super().__init__()
        self.student, self.normalizer = student, normalizer

    def forward(self, images: torch.Tensor):
        out = self.student(self.normalizer(images))
        return out.logits, out.logits_t


class NormalisedTeacher(nn.Module):
    def __init__(self, teacher: nn.Module, normalizer: Normalizer):
        super().__init__()
        self.teacher, self.normalizer = teacher, normalizer

    def forward(self, images: torch.Tensor):
        return self.teacher(self.normalizer(images))


def _export(model: nn.Module, example: torch.Tensor, output_names: list[str], what: str) -> bytes:
    batch = torch.export.Dim("batch", min=1)
    try:
        with warnings.catch_warnings(), io.StringIO() as sink:
            warnings.simplefilter("ignore")
            from contextlib import redirect_stdout
            with redirect_stdout(sink):  # the exporter prints progress on stdout; keep --json clean
                program = torch.onnx.export(model.eval(), (example,), dynamo=True, opset_version=OPSET,
                                            input_names=["images"], output_names=output_names,
                                            dynamic_shapes={"images": {0: batch}}, external_data=False)
    except Exception as exc:
        raise ONNXExportError(f"ONNX export of the {what} failed: {type(exc).__name__}: {exc}") from None
    return program.model_proto.SerializeToString()


def student_onnx_bytes(student: nn.Module, normalizer: Normalizer) -> bytes:
    """The folded student, unrolled over its T steps, as ONNX bytes."""
    example = torch.rand(2, *student.config.input_shape)
    return _export(UnrolledStudent(fold_student(student), normalizer), example, ["logits", "logits_t"], "student")


def teacher_onnx_bytes(teacher: nn.Module, normalizer: Normalizer, input_shape) -> bytes:
    example = torch.rand(2, *input_shape)
    return _export(NormalisedTeacher(teacher, normalizer).cpu(), example, ["logits"], "teacher")


def write_onnx(path: Path, data: bytes) -> None:
    write_bytes(Path(path), data)


def export_onnx(run_dir: Path, options: ExportOptions = ExportOptions()) -> dict:
    """``export --target onnx``: RUN_DIR/export/student.onnx (and teacher.onnx with
    ``options.teacher``) and their export.json record."""
    run_dir = Path(run_dir)
    spec = read_run_config(run_dir).teacher
    student = load_student(run_dir / STUDENT)
    normalizer = Normalizer(*spec.mean_std)
    out_dir = export_dir(run_dir)
    log("exporting the student to ONNX (unrolled over T steps; about 10 s)")
    files = [out_dir / export_kind("onnx").file]
    write_onnx(files[0], student_onnx_bytes(student, normalizer))
    if options.teacher:
        weights = teacher_weights(spec)
        files.append(out_dir / TEACHER_FILE)
        write_onnx(files[1], teacher_onnx_bytes(load_teacher(spec, weights), normalizer, spec.input_shape))
    rows = describe_student(student, LayerTable(student.config.input_shape)).rows
    return merge_record(out_dir, student_record(run_dir, student, "onnx", files, rows))
