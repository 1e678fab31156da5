"""The memory a distillation will need, estimated from its configuration before any work.

With P_s, P_t the student's and teacher's parameters, A_s the elements of all the student's
layer outputs for one image at one timestep, A_t the teacher's for one image, X the pixels of
one image, T timesteps, B the synthetic batch, b the KD minibatch (4 bytes per float32):

    parameters  = 16 P_s + 4 P_t                 student weights, gradients, Adam m and v; teacher
    KD step     = 4 (COPIES_S T b A_s + b X)     the student's activations over T steps
    synthesis   = 4 (COPIES_T B A_t + 4 B X + S) teacher activations; pixels, gradients, Adam m, v;
                                                 TAR's temperature schedule (S synthesis steps)
                + 4 COPIES_S T B A_s             (only when RCA or ADV run the student)
    pool        = min(--pool-memory-mb, rounds x processes x B x 4 X)   (one batch without --rounds)
    needed      = parameters + pool + max(KD step, synthesis)

A teacher from a factory or a .pt2 program (not a named architecture) is not built twice
to be measured: its terms count as 0, so only the student side is checked for it.

COPIES_S = 2 and COPIES_T = 1.5 copies of each activation are kept for the backward pass.
Measured peak memory over these estimates (CPU, one KD step or one synthesis step with Adam,
2026-12-02): convnet students on digits and CIFAR shapes (T 4-16, b 128-512) 2.3-4.4 times
the single-copy figure, a spiking ResNet 2.5, teachers 1.5-2.6; the copies above are at or
below every measured ratio, so the estimate stays under the real need. A refusal therefore
means the run cannot fit; a run just under the line may still run out, which the loop reports
as one line too.
"""

from __future__ import annotations

import math

import torch

from stars_deploy.errors import ConfigError
from stars_deploy.memory import activation_elements, on_meta, parameter_count, require
from stars_deploy.progress import debug
from stars_deploy.students import build_student
from stars_deploy.teachers import build_teacher

from .config import DistillConfig

FLOAT_BYTES = 4
BYTES_PER_MB = 2**20
COPIES_S = 2.0  # activations kept per student layer output for the backward (measured >= 2.3)
COPIES_T = 1.5  # per teacher layer output (measured >= 1.5)
ADVICE = "lower -T/--timesteps, --batch-size, --kd-batch-size, --width, --depth or --pool-memory-mb (or check --num-classes)"


def estimate(config: DistillConfig, processes: int = 1) -> dict[str, int]:
    """The parts of the formula above, in bytes, and their ``needed`` total."""
    spec, student_config, synthesis = config.teacher, config.student, config.synthesis
    pixels = math.prod(spec.input_shape)
    steps, batch, kd_batch = student_config.timesteps, synthesis.batch_size, config.kd_batch_size
    one_step = student_config.with_timesteps(1)
    try:
        student_params = parameter_count(on_meta(lambda: build_student(student_config)))
        teacher_params = parameter_count(on_meta(lambda: build_teacher(spec))) if spec.named else 0
    except (RuntimeError, TypeError, ValueError, OverflowError) as exc:  # sizes torch cannot even describe
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"the student or teacher cannot be built at this size ({reason[:200]}): {ADVICE}") from None
    try:
        student_acts = activation_elements(lambda: build_student(one_step), spec.input_shape)
        teacher_acts = activation_elements(lambda: build_teacher(spec), spec.input_shape) if spec.named else 0
    except Exception as exc:  # a family that cannot run on the meta device: parameters only
        debug(f"memory estimate without activations ({type(exc).__name__}: {exc})")
        student_acts = teacher_acts = 0
    kd = FLOAT_BYTES * (COPIES_S * steps * kd_batch * student_acts + kd_batch * pixels)
    synthesis_bytes = FLOAT_BYTES * (COPIES_T * batch * teacher_acts + 4 * batch * pixels + synthesis.steps)
    if synthesis.needs_student:
        synthesis_bytes += FLOAT_BYTES * COPIES_S * steps * batch * student_acts
    batches = config.rounds * processes if config.rounds else 1
    pool = min(config.pool_memory_mb * BYTES_PER_MB, batches * batch * pixels * FLOAT_BYTES)
    parts = {"parameters": 16 * student_params + FLOAT_BYTES * teacher_params, "KD step": kd,
             "synthesis": synthesis_bytes, "pool": pool}
    parts = {name: int(value) for name, value in parts.items()}
    parts["needed"] = parts["parameters"] + parts["pool"] + max(parts["KD step"], parts["synthesis"])
    return parts


def check_memory(config: DistillConfig, device: torch.device, processes: int = 1, local_processes: int = 1) -> dict:
    """Refuse a configuration whose estimate exceeds the free memory of ``device`` (shared by
    ``local_processes`` on a CPU); returns the estimate."""
    parts = estimate(config, processes)
    needed = parts.pop("needed")
    share = local_processes if device.type == "cpu" else 1
    require(needed, device, "this distillation", ADVICE, parts, share)
    return {**parts, "needed": needed}
