"""CUDA correctness checks, one table: what a GPU run must compute exactly as the CPU does.

    python benchmarks/cuda_checks.py                  # CUDA if present, else CPU against CPU
    python benchmarks/cuda_checks.py --teacher-weights .data/cifar10/resnet20_teacher.th \\
        --cifar-data .data/cifar10/test_lossless_200.npz --json checks.json

1. Loihi emulator: an exported random-weight convnet student (randomised BatchNorm
   statistics, exported to NIR and lowered to a netx .net file through the library, written
   and read back) run on CUDA and on the CPU over the held-out digits (and, with
   --cifar-data, a CIFAR-shaped student over those images): 0 spike mismatches in every
   layer and identical logits. The emulator is integer arithmetic (exact float64 sums on
   CUDA), so anything but 0 is a bug.
2. NIR reference: the same graph, CUDA against the CPU: 0 spike mismatches. This one runs
   in float32, so it holds only if CUDA's float32 sums round like the CPU's: cuDNN may sum
   in TF32 (torch's default for convolutions) or in another order, and a voltage within
   rounding of the threshold then flips. It runs with torch's defaults (what `simulate
   --device cuda` gets) and, when TF32 is allowed there, again with TF32 off, so a failure
   says which.
3. Compiled LIF kernel (``set_lif_kernel(model, "compiled")``) against Norse's cell: one LIF
   layer (currents placed exactly at the threshold included) and a whole student on digits;
   spikes bit for bit, input gradients within 1e-5 (absolute and relative). A compiler
   failure (the kernel's eager fallback, announced by a warning) fails the check.
4. bf16 teacher path (run before 3, whose compilation is slow on a busy machine) (``SynthesisConfig.teacher_bf16``): a short pixel synthesis (host, and
   stars with a student) with the ResNet-20 teacher (--teacher-weights; else a random digits
   teacher): every loss term finite, the images finite, the teacher's convolutions really
   in bfloat16; the fp32 L_BN of the same seed for comparison.

Without CUDA every check still runs its code path CPU against CPU and says "skipped: no
CUDA" (a CPU-vs-CPU mismatch still fails). Exit status 1 when a check fails.
Imports only stars_deploy.{students, neurons, teachers, data, exporters.*, targets.*,
synthesis}. Needs stars-deploy installed (`make install`) or laid out by
benchmarks/link_checkout.py (what gpu_check.sh does on the device, which has no install).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import torch

from stars_deploy.data import load_digits_split, load_npz
from stars_deploy.exporters.loihi_export import lower_nir
from stars_deploy.exporters.netx_format import read_network, write_network
from stars_deploy.exporters.nir_export import student_to_nir
from stars_deploy.exporters.nir_format import read_nir, write_nir
from stars_deploy.students.neurons import LIFConfig, LIFSequence, set_lif_kernel
from stars_deploy.students import StudentConfig, build_student
from stars_deploy.distillation.synthesis import PixelSynthesizer, SynthesisConfig
from stars_deploy.targets.loihi import LoihiEmulator
from stars_deploy.targets.nir_reference import NIRReference
from stars_deploy.targets.record import spike_mismatches
from stars_deploy.teachers import Normalizer, TeacherSpec, build_teacher, load_teacher

DIGITS_MEAN, DIGITS_STD = 0.5, 0.25  # the digits normalisation (teachers.py's "digits" preset)
IMAGENET = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
GRAD_TOLERANCE = 1e-5
STARS_WEIGHTS = {"l_rca": 1.0, "l_tar": 100.0}  # distill.py's stars preset (DEFAULT_L_RCA, DEFAULT_L_TAR)


class Checks:
    """Rows (check, compared, status, detail, seconds), PASS / FAIL / SKIP, each printed as a
    markdown table row when it is done, so a run cut short by its timeout keeps its rows."""

    def __init__(self, device: torch.device):
        self.device, self.rows = device, []
        self.cuda = device.type == "cuda"
        print("| check | compared | result | detail | s |\n|---|---|---|---|---|", flush=True)

    @property
    def compared(self) -> str:
        return "cuda vs cpu" if self.cuda else "cpu vs cpu"

    def add(self, name: str, status: str, detail: str, seconds: float, compared: str | None = None) -> None:
        row = {"check": name, "compared": compared or self.compared, "status": status, "detail": detail,
               "seconds": round(seconds, 1)}
        self.rows.append(row)
        shown = str(detail).replace("|", "/").replace("\n", " ")
        print(f"| {name} | {row['compared']} | {status} | {shown[:300]} | {row['seconds']} |", flush=True)
        print(f"{status} {name}: {detail}", file=sys.stderr, flush=True)

    def run(self, name: str, function, *args) -> None:
        begin = time.perf_counter()
        try:
            ok, detail = function(*args)
            status = "PASS" if ok else "FAIL"
            if ok and not self.cuda:
                status, detail = "SKIP", f"skipped: no CUDA; {detail}"
        except Exception as exc:  # a crash is a failed check, with its cause in the table
            status, detail = "FAIL", f"{type(exc).__name__}: {exc}"
            traceback.print_exc()
        self.add(name, status, detail, time.perf_counter() - begin)


def lively_student(input_shape, width: int, depth: int, timesteps: int, seed: int) -> torch.nn.Module:
    """A random-weight convnet student with random BatchNorm statistics and affine terms, so
    that folding is exercised and every layer spikes (eval mode, CPU)."""
    torch.manual_seed(seed)
    config = StudentConfig(family="convnet", input_shape=tuple(input_shape), width=width, depth=depth,
                           timesteps=timesteps)
    student = build_student(config)
    generator = torch.Generator().manual_seed(seed)
    for module in student.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            shape = module.running_mean.shape
            module.running_mean.copy_(torch.rand(shape, generator=generator) - 0.5)
            module.running_var.copy_(0.2 + 0.3 * torch.rand(shape, generator=generator))
            module.weight.data.copy_(0.5 + torch.rand(shape, generator=generator))
            module.bias.data.copy_(0.3 + 0.7 * torch.rand(shape, generator=generator))
    return student.eval()  # these ranges: 10-20 % of the neurons fire per step in every layer


def export(student, normalization, folder: Path, name: str):
    """(the NIR graph read back from its file, the netx network read back from its .net file)."""
    graph = student_to_nir(student, normalization=normalization)
    write_nir(folder / f"{name}.nir", graph)
    network, _ = lower_nir(read_nir(folder / f"{name}.nir"), source=name)
    write_network(folder / f"{name}.net", network)
    return read_nir(folder / f"{name}.nir"), read_network(folder / f"{name}.net")


def compare_records(record, reference) -> tuple[bool, str]:
    per_layer = spike_mismatches(record, reference)
    total = sum(per_layer.values())
    spikes = sum(reference.spike_counts().values())
    silent = [name for name, count in reference.spike_counts().items() if count == 0]
    logit_diff = float((record.logits_t.cpu().double() - reference.logits_t.cpu().double()).abs().max())
    detail = (f"{total} of {spikes:,} spikes differ (per layer {'/'.join(str(v) for v in per_layer.values())}); "
              f"max logit diff {logit_diff:.1e}"
              + (f"; silent layers {', '.join(silent)} (a silent layer proves nothing)" if silent else ""))
    return total == 0 and not silent, detail


def check_loihi(network, images, device) -> tuple[bool, str]:
    reference = LoihiEmulator(network, device="cpu").run(images)
    record = LoihiEmulator(network, device=device).run(images).cpu()
    ok, detail = compare_records(record, reference)
    same_logits = torch.equal(record.logits_t, reference.logits_t)
    return ok and same_logits, f"{detail}, logits identical: {same_logits}; {len(images)} images"


def check_nir(graph, images, device, tf32: bool | None) -> tuple[bool, str]:
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    try:
        if tf32 is not None:
            torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = tf32
        reference = NIRReference(graph, device="cpu").run(images)
        record = NIRReference(graph, device=device).run(images).cpu()
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
    ok, detail = compare_records(record, reference)
    return ok, f"{detail}; {len(images)} images"


def _run_lif(function):
    """function() under a warning recorder: (its result, whether torch.compile failed)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = function()
    failed = [w for w in caught if "torch.compile of the LIF kernels failed" in str(w.message)]
    return result, bool(failed)


def _gradients_close(grad, reference) -> tuple[bool, float]:
    diff = (grad - reference).abs()
    return bool((diff <= GRAD_TOLERANCE + GRAD_TOLERANCE * reference.abs()).all()), float(diff.max())


def check_lif_layer(device) -> tuple[bool, str]:
    torch.manual_seed(0)
    config = LIFConfig()
    norse, compiled = LIFSequence(config).to(device), LIFSequence(config).to(device)
    if set_lif_kernel(compiled, "compiled") != 1:
        return False, "the default LIF layer cannot take the compiled kernel"
    currents = torch.randn(6, 64, 8, 9, 9, device=device) * 2
    currents[:, 0] = 2.0  # v lands exactly on v_th = 1 at step 1: the strict threshold must hold
    inputs = [currents.clone().requires_grad_(True) for _ in range(2)]
    weights = torch.randn(currents.shape, device=device)
    reference = norse(inputs[0])
    (reference * weights).sum().backward()

    def compiled_pass():
        spikes = compiled(inputs[1])
        (spikes * weights).sum().backward()
        return spikes
    spikes, compile_failed = _run_lif(compiled_pass)
    mismatches = int((spikes != reference).sum())
    close, max_diff = _gradients_close(inputs[1].grad, inputs[0].grad)
    ok = mismatches == 0 and close and not compile_failed and 0 < float(reference.detach().mean()) < 1
    return ok, (f"{mismatches} of {reference.numel():,} spikes differ; grad max diff {max_diff:.1e} "
                f"(max grad {float(inputs[0].grad.abs().max()):.1e})"
                + ("; torch.compile FAILED, eager fallback ran" if compile_failed else ""))


def check_lif_student(images, device) -> tuple[bool, str]:
    norse = lively_student((1, 8, 8), 16, 3, 4, seed=2).to(device)
    compiled = copy.deepcopy(norse)
    fusable = set_lif_kernel(compiled, "compiled")
    inputs = [((images - DIGITS_MEAN) / DIGITS_STD).to(device).requires_grad_(True) for _ in range(2)]
    reference = norse(inputs[0])
    reference.logits.square().sum().backward()

    def compiled_pass():
        out = compiled(inputs[1])
        out.logits.square().sum().backward()
        return out
    out, compile_failed = _run_lif(compiled_pass)
    mismatches = {name: int((out.spikes[name] != spikes).sum()) for name, spikes in reference.spikes.items()}
    close, max_diff = _gradients_close(inputs[1].grad, inputs[0].grad)
    ok = sum(mismatches.values()) == 0 and close and not compile_failed and fusable > 0
    return ok, (f"{fusable} compiled layers; spikes differing per layer {'/'.join(str(v) for v in mismatches.values())}; "
                f"input grad max diff {max_diff:.1e} (max grad {float(inputs[0].grad.abs().max()):.1e}); "
                f"{len(images)} digits"
                + ("; torch.compile FAILED, eager fallback ran" if compile_failed else ""))


def bf16_teacher(weights: Path | None):
    """(spec, teacher): the ResNet-20 checkpoint, or a random digits teacher with random BN statistics."""
    if weights is not None and weights.is_file():
        spec = TeacherSpec(arch="cifar_resnet20", weights=str(weights), normalization="imagenet")
        return spec, load_teacher(spec, weights), f"cifar_resnet20 ({weights.name})"
    spec = TeacherSpec()
    teacher = build_teacher(spec)
    generator = torch.Generator().manual_seed(3)
    for module in teacher.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.copy_(torch.randn(module.running_mean.shape, generator=generator) * 0.3)
            module.running_var.copy_(0.5 + torch.rand(module.running_var.shape, generator=generator))
    teacher.eval().requires_grad_(False)
    return spec, teacher, "digits_cnn (random weights)"


def check_bf16(weights: Path | None, device, batch_size: int, steps: int) -> tuple[bool, str]:
    spec, teacher, teacher_name = bf16_teacher(weights)
    teacher = teacher.to(device)
    normalizer = Normalizer(*spec.mean_std).to(device)
    student = lively_student(spec.input_shape, 16, 3, 4, seed=4).to(device)
    dtypes = set()
    first_conv = next(m for m in teacher.modules() if isinstance(m, torch.nn.Conv2d))
    hook = first_conv.register_forward_hook(lambda module, args, output: dtypes.add(str(output.dtype)))
    parts, ok = [], True
    try:
        for objective, extra in (("host", {}), ("stars", STARS_WEIGHTS)):
            losses = {}
            for bf16 in (True, False):
                torch.manual_seed(0)
                dtypes.clear()
                config = SynthesisConfig(batch_size=batch_size, steps=steps, teacher_bf16=bf16,
                                         student_every=max(1, steps // 2), **extra)
                synthesizer = PixelSynthesizer(teacher, normalizer, config, spec.num_classes, spec.flips)
                images, terms = synthesizer.synthesize(student if objective == "stars" else None,
                                                       spec.input_shape, device)
                if bf16:
                    finite = all(math.isfinite(v) for v in terms.values()) and bool(torch.isfinite(images).all())
                    in_bf16 = dtypes == {"torch.bfloat16"}
                    ok = ok and finite and in_bf16 and (objective != "stars" or "rca" in terms)
                    parts.append(f"{objective}: {'finite' if finite else 'NOT FINITE'} "
                                 f"({', '.join(f'{k} {v:.3g}' for k, v in sorted(terms.items()) if k != 'l2')}), "
                                 f"conv {'/'.join(sorted(d.replace('torch.', '') for d in dtypes))}")
                losses[bf16] = terms["bn"]
            parts[-1] += f", L_BN fp32 {losses[False]:.4g}"
    finally:
        hook.remove()
    return ok, f"{teacher_name}, B {batch_size}, {steps} steps; " + "; ".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="auto (CUDA if present), cuda, or cpu (CPU against CPU)")
    parser.add_argument("--teacher-weights", type=Path, default=None, help="ResNet-20 checkpoint for the bf16 check")
    parser.add_argument("--cifar-data", type=Path, default=None,
                        help=".npz of CIFAR images (e.g. test_lossless_200.npz): a CIFAR-shaped student too")
    parser.add_argument("--cifar-samples", type=int, default=200)
    parser.add_argument("--bf16-batch", type=int, default=None, help="[256 on CUDA, 16 on the CPU]")
    parser.add_argument("--bf16-steps", type=int, default=None, help="[20 on CUDA, 2 on the CPU]")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON here")
    args = parser.parse_args()
    want_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if want_cuda and not torch.cuda.is_available():
        sys.exit("cuda_checks: --device cuda, but torch sees no CUDA device")
    device = torch.device("cuda" if want_cuda else "cpu")
    checks = Checks(device)
    tf32_default = torch.backends.cudnn.allow_tf32
    print(f"cuda_checks: torch {torch.__version__}, device {device}"
          + (f" ({torch.cuda.get_device_name(device)}), cuDNN TF32 allowed by default: {tf32_default}"
             if checks.cuda else ""), file=sys.stderr, flush=True)
    digits = load_digits_split("test").images
    digits_normalised = (digits - DIGITS_MEAN) / DIGITS_STD
    cases = [("digits", lively_student((1, 8, 8), 16, 3, 4, seed=1), ([DIGITS_MEAN], [DIGITS_STD]),
              digits_normalised)]
    if args.cifar_data is not None and args.cifar_data.is_file():
        cifar = load_npz(args.cifar_data).images[:args.cifar_samples]
        mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in IMAGENET)
        cases.append(("cifar", lively_student((3, 32, 32), 32, 5, 4, seed=5), IMAGENET, (cifar - mean) / std))
    with tempfile.TemporaryDirectory() as scratch:
        for name, student, normalization, images in cases:
            try:
                graph, network = export(student, normalization, Path(scratch), name)
            except Exception as exc:
                traceback.print_exc()
                checks.add(f"export {name} student", "FAIL", f"{type(exc).__name__}: {exc}", 0.0, compared="-")
                continue
            checks.run(f"loihi emulator, {name} student", check_loihi, network, images, device)
            checks.run(f"nir reference, {name} student (torch defaults)", check_nir, graph, images, device, None)
            if checks.cuda and tf32_default:
                checks.run(f"nir reference, {name} student (TF32 off)", check_nir, graph, images, device, False)
    # bf16 before the LIF kernels, whose compilation can take minutes on a busy machine
    checks.run("bf16 teacher synthesis", check_bf16, args.teacher_weights, device,
               args.bf16_batch or (256 if checks.cuda else 16), args.bf16_steps or (20 if checks.cuda else 2))
    checks.run("compiled LIF, one layer", check_lif_layer, device)
    checks.run("compiled LIF, digits student", check_lif_student, digits, device)
    failed = [r["check"] for r in checks.rows if r["status"] == "FAIL"]
    print(f"\n{len(checks.rows)} checks on {device}: {len(failed)} failed" + (f" ({', '.join(failed)})" if failed else ""))
    if args.json:
        args.json.write_text(json.dumps({"device": str(device), "torch": torch.__version__, "rows": checks.rows},
                                        indent=1))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
