"""The user-facing options of ``distill``: one flat schema for the command line and for a
pipeline file's ``[distill]`` table.

Each :class:`Option` names its flag, type, default, help, topic and (for fixed choices) the
choices. The CLI builds its click options from this table; ``pipeline`` validates TOML keys
and types against it; :func:`config_from_options` turns the values into a
:class:`DistillConfig`. Nothing here imports click: the library never does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from stars_deploy.errors import ConfigError
from stars_deploy.runs import check_run_name
from stars_deploy.students import FAMILIES
from stars_deploy.students.neurons import LIF_KERNELS, SURROGATES, LIFConfig
from stars_deploy.teachers import ARCHITECTURES, NORMALIZATIONS, TeacherSpec

from .augment import MIX_MODES
from .config import (AUTO_OBJECTIVE, DEFAULT_BUDGET_S, DEFAULT_SPIKING_FRACTION, DEFAULT_SYNTHESIS_FRACTION, HOSTS,
                     KD_MODES, OBJECTIVES, STRATEGIES, TWIN_MIN_SIDE, TWIN_SYNTHESIS_DEFAULTS, DistillConfig, make_config)
from .generator import GENERATOR_STEPS, GENERATOR_Z_LR
from .objectives import RCA_VARIANTS
from .synthesis import COMPILE_MODES, GENERATOR_META, INITS, SYNTHESIS_METHODS, SynthesisConfig

DIGITS_TEACHER = "digits_cnn"  # the one architecture with a cached default checkpoint


def _default(config_class, name: str) -> str:
    """How --help shows a default the library's dataclass owns (the option itself is None,
    so the dataclass decides)."""
    value = config_class.__dataclass_fields__[name].default
    return f"{value:g}" if isinstance(value, float) else str(value)


@dataclass(frozen=True)
class Option:
    """One option: ``--flag`` on the command line, ``flag = value`` in a pipeline file."""

    name: str  # the Python name (the keyword of config_from_options)
    flag: str  # the long flag without dashes, also the TOML key
    kind: type  # int, float, str, bool or Path
    default: Any
    help: str
    group: str
    choices: Sequence[str] | Callable[[], Sequence[str]] | None = None
    show_default: str | bool = True  # True: the default itself; a string: how the default is derived
    short: str | None = None  # "-T"
    aliases: tuple[str, ...] = ()  # old spellings, still accepted, hidden from help

    def choice_list(self) -> list[str] | None:
        if self.choices is None:
            return None
        return list(self.choices() if callable(self.choices) else self.choices)


TEACHER, STUDENT, OBJECTIVE, SYNTHESIS, BUDGET, KD, EVALUATION, RUN, SPEED = (
    "Teacher", "Student", "Objective", "Synthesis", "Budget", "Student training (KD)", "Evaluation",
    "Run directory", "Speed")

TEACHER_OPTIONS = (
    Option("arch", "teacher", str, DIGITS_TEACHER, "The teacher: a named architecture "
           f"({', '.join(ARCHITECTURES)}), a package.module:function returning your nn.Module, or a "
           "torch.export .pt2 file.", TEACHER),
    Option("weights", "weights", Path, None, "Teacher checkpoint (a state_dict; a 'module.' prefix is fine), "
           "loaded with weights_only=True.", TEACHER, show_default="the cached digits teacher"),
    Option("normalization", "normalization", str, "", "Input normalisation: a preset "
           f"({', '.join(NORMALIZATIONS)}) or 'm1,m2,m3/s1,s2,s3'.", TEACHER, show_default="the architecture's"),
    Option("num_classes", "num-classes", int, 10, "Classes of the teacher's output.", TEACHER),
    Option("input_shape", "input-shape", str, None, "C,H,W of the teacher's input, for teachers that are not "
           "named architectures.", TEACHER, show_default="the architecture's, or the .pt2 program's"),
    Option("no_hflip", "no-hflip", bool, False, "Horizontal flips change the label (text, digits): never flip "
           "synthetic or KD images. By default only named architectures of such data and 1-channel teachers "
           "do not flip.", TEACHER),
)

DISTILL_OPTIONS = TEACHER_OPTIONS + (
    Option("family", "student", str, "convnet", "Student family.", STUDENT, choices=lambda: list(FAMILIES)),
    Option("width", "width", int, None, "Channels of the first layer.", STUDENT, show_default="the family's"),
    Option("depth", "depth", int, None, "Conv layers (convnet) or 6n+2 (resnet).", STUDENT, show_default="the family's"),
    Option("timesteps", "timesteps", int, 4, "Timesteps T per sample.", STUDENT, short="-T"),
    Option("tau_mem_steps", "tau-mem-steps", float, None, "Membrane time constant in steps.", STUDENT,
           show_default=_default(LIFConfig, "tau_mem_steps")),
    Option("tau_syn_steps", "tau-syn-steps", float, None, "Synaptic time constant in steps (CUBA neurons).",
           STUDENT, show_default="none: current-free LIF"),
    Option("surrogate", "surrogate", str, None, "Surrogate gradient.", STUDENT, choices=SURROGATES,
           show_default=_default(LIFConfig, "surrogate")),
    Option("surrogate_alpha", "surrogate-alpha", float, None, "Surrogate sharpness.", STUDENT,
           show_default=_default(LIFConfig, "surrogate_alpha")),
    Option("objective", "objective", str, AUTO_OBJECTIVE, "host (BN + CE), rca, tar, or stars (host + RCA + TAR); "
           "auto: rca on the twin route, host on the direct route.", OBJECTIVE,
           choices=lambda: [AUTO_OBJECTIVE, *OBJECTIVES]),
    Option("host", "host", str, "deepinversion", "deepinversion (pixel optimisation) or adi (plus the "
           "competition term).", OBJECTIVE, choices=HOSTS),
    Option("l_bn", "l-bn", float, None, "Weight of L_BN.", OBJECTIVE, show_default=_default(SynthesisConfig, "l_bn")),
    Option("l_ce", "l-ce", float, None, "Weight of L_CE.", OBJECTIVE, show_default=_default(SynthesisConfig, "l_ce")),
    Option("l_adv", "l-adv", float, None, "Weight of the competition term.", OBJECTIVE,
           show_default="0; 1 with --host adi"),
    Option("l_tv", "l-tv", float, None, "Weight of total variation.", OBJECTIVE,
           show_default=_default(SynthesisConfig, "l_tv")),
    Option("l_l2", "l-l2", float, None, "Weight of the pixel L2 prior.", OBJECTIVE,
           show_default=_default(SynthesisConfig, "l_l2")),
    Option("l_rca", "l-rca", float, None, "Weight of L_RCA in synthesis.", OBJECTIVE, show_default="the objective's"),
    Option("l_tar", "l-tar", float, None, "Weight of L_TAR in synthesis.", OBJECTIVE, show_default="the objective's"),
    Option("l_tar_student", "l-tar-student", float, None, "Weight of METHOD.md's student-tail TAR in synthesis: each "
           "student layer's soft firing rate (its current against the one that fires within T steps) matched to the "
           "teacher's ReLU rate at the same relative depth.", OBJECTIVE,
           show_default=_default(SynthesisConfig, "l_tar_student")),
    Option("b_rca", "b-rca", float, None, "Weight of L_RCA in the student loss.", OBJECTIVE,
           show_default="the objective's"),
    Option("rca_variant", "rca-variant", str, None, "RCA form: cosine Gram, similarity-preserving or RKD.",
           OBJECTIVE, choices=RCA_VARIANTS, show_default=_default(SynthesisConfig, "rca_variant")),
    Option("student_every", "student-every", int, None, "Run the student for RCA, ADV and the student-tail TAR "
           "every k synthesis steps (always the last).", OBJECTIVE,
           show_default=_default(SynthesisConfig, "student_every")),
    Option("method", "synthesizer", str, None, "pixel (optimise each batch's pixels) or generator (FastDFKD: a "
           "generator meta-learned across batches).", SYNTHESIS, choices=SYNTHESIS_METHODS,
           show_default=_default(SynthesisConfig, "method")),
    Option("synthesis_init", "synthesis-init", str, None, "Where pixel optimisation starts: N(0, 1) noise, or "
           "noise at 1/4 of the side upsampled (smooth).", SYNTHESIS, choices=INITS,
           show_default="smooth with --strategy twin, else noise"),
    Option("batch_size", "batch-size", int, None, "Synthetic images per batch.", SYNTHESIS, show_default=_default(SynthesisConfig, "batch_size")),
    Option("synthesis_steps", "synthesis-steps", int, None, "Adam steps per synthetic batch.", SYNTHESIS,
           show_default=f"{SynthesisConfig.steps} pixel ({TWIN_SYNTHESIS_DEFAULTS['steps']} with --strategy twin), "
                        f"{GENERATOR_STEPS} generator"),
    Option("synthesis_lr", "synthesis-lr", float, None, "Learning rate of the pixels (or of z).", SYNTHESIS,
           show_default=f"{SynthesisConfig.lr:g} pixel, {GENERATOR_Z_LR:g} generator"),
    Option("generator_lr", "generator-lr", float, None, "Generator host: inner learning rate.", SYNTHESIS,
           show_default=_default(SynthesisConfig, "generator_lr")),
    Option("generator_meta", "generator-meta", str, None, "Generator host: meta gradient, reptile (G - G') or "
           "fomaml (first-order MAML).", SYNTHESIS, choices=GENERATOR_META,
           show_default=_default(SynthesisConfig, "generator_meta")),
    Option("bn_momentum", "bn-momentum", float, None, "FastDFKD's BN momentum m: L_BN matches each batch's "
           "statistics blended with a running average of earlier batches.", SYNTHESIS,
           show_default=_default(SynthesisConfig, "bn_momentum")),
    Option("bn_groups", "bn-groups", int, None, "Optimise the synthetic batch as G independent batches, each "
           "matched to the BN statistics on its own.", SYNTHESIS,
           show_default=_default(SynthesisConfig, "bn_groups")),
    Option("rounds", "rounds", int, None, "Budget in synthesise -> KD rounds.", BUDGET, show_default="none"),
    Option("budget_s", "budget-s", float, None, "Budget in wall-clock seconds of distillation.", BUDGET,
           show_default=f"{DEFAULT_BUDGET_S:g} when --rounds is not given"),
    Option("kd_steps", "kd-steps", int, None, "Student steps per round.", KD,
           show_default=_default(DistillConfig, "kd_steps")),
    Option("kd_batch_size", "kd-batch-size", int, None, "Student minibatch.", KD,
           show_default=_default(DistillConfig, "kd_batch_size")),
    Option("kd_lr", "kd-lr", float, None, "Student Adam learning rate.", KD,
           show_default=_default(DistillConfig, "kd_lr")),
    Option("kd_temperature", "kd-temperature", float, None, "KD temperature tau.", KD,
           show_default=_default(DistillConfig, "kd_temperature")),
    Option("strategy", "strategy", str, "auto", "direct: KD of the spiking student, interleaved with synthesis; "
           "twin: synthesis first, then KD of the student's rate twin (each LIF replaced by its exact "
           "constant-current rate, same weights), which is 8-10x cheaper per image; auto: twin for a convnet "
           f"student of a teacher of images at least {TWIN_MIN_SIDE} px on a side, else direct.", KD,
           choices=STRATEGIES),
    Option("synthesis_fraction", "synthesis-fraction", float, None, "Twin: the share of the budget spent "
           "synthesising before the twin's KD.", KD, show_default=f"{DEFAULT_SYNTHESIS_FRACTION:g}"),
    Option("spiking_fraction", "spiking-fraction", float, None, "Twin: the last share of the budget in which "
           "KD trains the spiking student itself (a brief fine-tune after its rate twin); 0: none.", KD,
           show_default=f"{DEFAULT_SPIKING_FRACTION:g} with --strategy twin, else 0"),
    Option("spiking_lr", "spiking-lr", float, None, "Twin: the Adam learning rate of that fine-tune (fixed).", KD,
           show_default=_default(DistillConfig, "spiking_lr")),
    Option("kd_mix", "kd-mix", str, None, "Mix KD minibatch images pairwise (the teacher labels the mixed "
           "view).", KD, choices=MIX_MODES, show_default="both with --strategy twin, else none"),
    Option("kd_mode", "kd-mode", str, None, "KL on time-averaged logits, or per step.", KD, choices=KD_MODES,
           show_default=_default(DistillConfig, "kd_mode")),
    Option("seed", "seed", int, 0, "Random seed.", RUN),
    Option("eval_data", "data", str, None, "Evaluation data (never used for distillation): digits, a .npz "
           "(images N,H,W,C uint8 + labels) or a CIFAR pickle folder.", EVALUATION,
           show_default="digits for the digits teacher, else none", aliases=("eval-data",)),
    Option("no_eval", "no-eval", bool, False, "Skip evaluation.", EVALUATION),
    Option("snapshot_every_s", "snapshot-every-s", float, None, "Keep the student every S seconds of "
           "distillation (RUN_DIR/snapshots/); with --strategy direct one run answers shorter budgets (the twin "
           "route's phases scale with the budget).", EVALUATION,
           show_default="none"),
    Option("eval_every", "eval-every", int, None, "Evaluate every N rounds.", EVALUATION,
           show_default=_default(DistillConfig, "eval_every")),
    Option("checkpoint_every", "checkpoint-every", int, None, "Checkpoint every N rounds.", RUN,
           show_default=_default(DistillConfig, "checkpoint_every")),
    Option("pool_memory_mb", "pool-memory-mb", float, None, "Pool memory before spilling to disk (MiB).", RUN,
           show_default=_default(DistillConfig, "pool_memory_mb")),
    Option("runs_dir", "runs-dir", Path, Path("runs"), "Where run directories are made.", RUN),
    Option("run_name", "name", str, None, "Run directory name.", RUN, show_default="derived from the config"),
    Option("device", "device", str, "auto", "auto, cpu, cuda or cuda:N.", SPEED),
    Option("teacher_bf16", "teacher-bf16", bool, False, "Run the teacher under bfloat16 autocast.", SPEED),
    Option("channels_last", "channels-last", bool, None, "NHWC memory layout for the convolutions.", SPEED,
           show_default="on with --strategy twin, else off"),
    Option("kd_bf16", "kd-bf16", bool, None, "Run the KD forward passes (teacher and student) under bfloat16 "
           "autocast.", SPEED, show_default="on with --strategy twin where bf16 is native (AVX512-BF16/AMX, GPUs)"),
    Option("compile_student", "compile-student", bool, None, "torch.compile the model the KD steps train "
           "(~20 s once).", SPEED, show_default="on with --strategy twin, else off"),
    Option("lif_kernel", "lif-kernel", str, "auto", "Student LIF layers: norse (step Norse's cell), fused (one "
           "autograd node), compiled (torch.compile'd fused kernels); auto: compiled on CUDA, norse on the CPU.",
           SPEED, choices=LIF_KERNELS),
    Option("compile_synthesis", "compile-synthesis", str, None, "torch.compile the teacher side of the synthesis "
           "objective (reduce-overhead: also CUDA graphs on a GPU); compiling takes ~10-70 s once.", SPEED,
           choices=COMPILE_MODES, show_default=_default(SynthesisConfig, "compile")),
)
RUN_OPTIONS = ("runs_dir", "run_name")  # where the run goes, not part of its configuration


def by_flag(options: Sequence[Option] = DISTILL_OPTIONS) -> dict[str, Option]:
    """Every accepted key (flag, alias, Python name, underscores for dashes) -> its option."""
    keys = {}
    for option in options:
        for key in (option.flag, option.name, *option.aliases):
            keys[key] = option
            keys[key.replace("-", "_")] = option
            keys[key.replace("_", "-")] = option
    return keys


def defaults(options: Sequence[Option] = DISTILL_OPTIONS) -> dict[str, Any]:
    return {option.name: option.default for option in options}


def check_value(option: Option, value: Any, where: str) -> Any:
    """``value`` as ``option`` takes it, or a ConfigError naming ``where`` and the key: integers
    where integers are due (1.7 is refused, not truncated), finite numbers, known choices."""
    def refuse(expected: str):
        raise ConfigError(f"{where}: {option.flag} = {value!r}: {expected}")

    if option.kind is bool:
        if not isinstance(value, bool):
            refuse(f"{value!r} is not a valid boolean: give true or false")
        return value
    if option.kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            refuse(f"{value!r} is not a valid integer")
        return value
    if option.kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            refuse(f"{value!r} is not a valid number")
        if not math.isfinite(value):
            refuse(f"{value!r} is not a finite number")
        return float(value)
    if not isinstance(value, str):
        refuse(f"{value!r} is not a string")
    choices = option.choice_list()
    if choices is not None and value not in choices:
        refuse(f"{value!r} is not one of {', '.join(choices)}")
    return Path(value) if option.kind is Path else value


def options_from_table(table: dict, where: str) -> dict[str, Any]:
    """Every distill option's value from a TOML table (keys named like the flags), checked,
    the others at their defaults."""
    keys, values = by_flag(), defaults()
    for key, value in table.items():
        option = keys.get(key)
        if option is None:
            raise ConfigError(f"{where}: unknown key {key!r}; use the options of `stars-deploy distill --help` "
                              "without their dashes (except json, quiet and resume)")
        values[option.name] = check_value(option, value, where)
    return values


def check_run_options(runs_dir: Path | None, run_name: str | None, where: str | None = None) -> None:
    """Where a run will be written, checked before any work: the name is one directory name;
    a pipeline file (``where`` names it) may only put its runs inside the directory it is run
    from (relative, no '..'): a CI config must not write elsewhere. On the command line any
    --runs-dir is the user's own choice."""
    if run_name is not None:
        check_run_name(run_name, f"{where}: name" if where else "--name")
    if where is not None and runs_dir is not None:
        path = Path(runs_dir)
        if path.is_absolute() or ".." in path.parts:
            raise ConfigError(f"{where}: runs-dir = {str(runs_dir)!r}: a pipeline file may only name a folder "
                              "inside the directory it runs in (relative, no '..')")


def _shape(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        shape = tuple(int(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise ConfigError(f"--input-shape {text!r}: give C,H,W, three positive integers (e.g. 3,32,32)")
    return shape


def teacher_spec(arch: str, weights: Path | None, normalization: str, num_classes: int,
                 input_shape: str | None = None, no_hflip: bool = False) -> TeacherSpec:
    """The TeacherSpec of the teacher options, checked now rather than mid-run: a named
    architecture, a ``package.module:function`` or a ``.pt2`` program (teachers/sources.py)."""
    from stars_deploy.teachers.adapters import load_program, program_input_shape
    from stars_deploy.teachers.sources import FACTORY, PROGRAM, is_factory, is_program

    shape, hflip = _shape(input_shape), (False if no_hflip else None)
    weights = str(weights) if weights else None
    if arch in ARCHITECTURES:
        if shape is not None and shape != ARCHITECTURES[arch].input_shape:
            raise ConfigError(f"--input-shape {input_shape}: --teacher {arch} takes {ARCHITECTURES[arch].input_shape}")
        if weights is None and arch != DIGITS_TEACHER:
            raise ConfigError(f"--teacher {arch} needs --weights PATH (only {DIGITS_TEACHER} has a cached default)")
        spec = TeacherSpec(arch=arch, weights=weights, normalization=normalization, num_classes=num_classes,
                           hflip=hflip)
    elif is_program(arch):
        if weights is not None:
            raise ConfigError(f"--teacher {arch} is a torch.export program, which holds its weights: drop --weights")
        shape = shape or program_input_shape(load_program(Path(arch)))
        if shape is None:
            raise ConfigError(f"--teacher {arch}: the program's input shape is not fixed: give --input-shape C,H,W")
        spec = TeacherSpec(arch=PROGRAM, weights=arch, normalization=normalization, num_classes=num_classes,
                           shape=shape, hflip=hflip)
    elif is_factory(arch):
        spec = TeacherSpec(arch=FACTORY, factory=arch, weights=weights, normalization=normalization,
                           num_classes=num_classes, shape=shape, hflip=hflip)
    else:
        raise ConfigError(f"unknown teacher {arch!r}: give a named architecture ({', '.join(ARCHITECTURES)}), "
                          "package.module:function or a .pt2 file")
    spec.mean_std  # validates the normalisation against the channels
    return spec


def config_from_options(values: dict[str, Any], teacher: TeacherSpec | None = None) -> DistillConfig:
    """The DistillConfig for the distill options ``values`` (Python names; missing ones at
    their defaults; the run-directory options are ignored). ``teacher``: a spec made by the
    caller (the Python API's module teachers), instead of the teacher options."""
    v = {**defaults(), **values}
    spec = teacher or teacher_spec(v["arch"], v["weights"], v["normalization"], v["num_classes"], v["input_shape"],
                                   v["no_hflip"])
    budget_s = DEFAULT_BUDGET_S if v["budget_s"] is None and v["rounds"] is None else v["budget_s"]
    return make_config(
        v["objective"], teacher=spec, host=v["host"],
        student={"family": v["family"], "width": v["width"], "depth": v["depth"], "timesteps": v["timesteps"]},
        lif={"tau_mem_steps": v["tau_mem_steps"], "tau_syn_steps": v["tau_syn_steps"],
             "surrogate": v["surrogate"], "surrogate_alpha": v["surrogate_alpha"]},
        synthesis={"batch_size": v["batch_size"], "steps": v["synthesis_steps"], "lr": v["synthesis_lr"],
                   "l_bn": v["l_bn"], "l_ce": v["l_ce"], "l_adv": v["l_adv"], "l_tv": v["l_tv"], "l_l2": v["l_l2"],
                   "l_rca": v["l_rca"], "l_tar": v["l_tar"], "l_tar_student": v["l_tar_student"],
                   "rca_variant": v["rca_variant"],
                   "student_every": v["student_every"], "method": v["method"], "generator_lr": v["generator_lr"],
                   "generator_meta": v["generator_meta"], "bn_momentum": v["bn_momentum"],
                   "teacher_bf16": v["teacher_bf16"], "bn_groups": v["bn_groups"],
                   "compile": v["compile_synthesis"], "init": v["synthesis_init"]},
        rounds=v["rounds"], budget_s=budget_s, b_rca=v["b_rca"], kd_steps=v["kd_steps"],
        kd_batch_size=v["kd_batch_size"], kd_lr=v["kd_lr"], kd_temperature=v["kd_temperature"],
        kd_mode=v["kd_mode"], seed=v["seed"], eval_data=None if v["no_eval"] else (v["eval_data"] or "auto"),
        eval_every=v["eval_every"], checkpoint_every=v["checkpoint_every"], pool_memory_mb=v["pool_memory_mb"],
        device=v["device"], channels_last=v["channels_last"], lif_kernel=v["lif_kernel"], strategy=v["strategy"],
        synthesis_fraction=v["synthesis_fraction"], spiking_fraction=v["spiking_fraction"],
        spiking_lr=v["spiking_lr"], kd_mix=v["kd_mix"], kd_bf16=v["kd_bf16"],
        compile_student=v["compile_student"], snapshot_every_s=v["snapshot_every_s"])
