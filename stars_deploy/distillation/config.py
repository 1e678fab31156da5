"""The distillation configuration: every setting of a run, stored in its manifest.

:class:`DistillConfig` is the complete, validated configuration (teacher, student,
synthesis, KD, budget, evaluation, device); :func:`make_config` builds one from an
objective shorthand plus explicit overrides, which is what the CLI's options and a
pipeline's ``[distill]`` table go through (options.py).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from stars_deploy.devices import DEVICE_CHOICES, fast_bf16
from stars_deploy.errors import CheckpointError, ConfigError
from stars_deploy.layout import MANIFEST
from stars_deploy.runs import read_manifest
from stars_deploy.students import StudentConfig
from stars_deploy.students.neurons import LIF_KERNELS, LIFConfig
from stars_deploy.teachers import TeacherSpec
from stars_deploy.validation import check_record, check_table

from .augment import MIX_MODES
from .generator import GENERATOR_STEPS, GENERATOR_Z_LR
from .synthesis import SynthesisConfig

DEFAULT_BUDGET_S = 90.0  # seconds of distillation when neither rounds nor a budget is given
# Objective shorthands: the STARS weights each one switches on (explicit options override).
# Measured on the digits default (25 rounds, seed 0): l_rca 10 / b_rca 1 cost 7 points against
# l_rca 1 / b_rca 0.1; TAR terms are ~1e-3 per layer, so l_tar 1 does nothing and 100 measured best.
DEFAULT_L_RCA = 1.0
DEFAULT_B_RCA = 0.1
DEFAULT_L_TAR = 100.0
OBJECTIVES = {
    "host": {"l_rca": 0.0, "l_tar": 0.0, "b_rca": 0.0},
    "rca": {"l_rca": DEFAULT_L_RCA, "l_tar": 0.0, "b_rca": DEFAULT_B_RCA},
    "tar": {"l_rca": 0.0, "l_tar": DEFAULT_L_TAR, "b_rca": 0.0},
    "stars": {"l_rca": DEFAULT_L_RCA, "l_tar": DEFAULT_L_TAR, "b_rca": DEFAULT_B_RCA},
}
# "auto" (the default objective): host on the direct route, TWIN_OBJECTIVE on the twin route.
# Measured on CIFAR-10 ResNet-20, 2-core EPYC with avx512_bf16, 2 seeds (benchmarks/README.md):
# rca beat host on every seed, by 2.2 points at 10 min and by 5.2 at 20 min (43.7/46.3 % against
# 42.0/37.6 %); on digits (direct) host leads at equal wall clock (host-vs-stars-digits.md).
AUTO_OBJECTIVE = "auto"
TWIN_OBJECTIVE = "rca"
DIRECT_OBJECTIVE = "host"
KD_MODES = ("mean", "per_step")
HOSTS = ("deepinversion", "adi")  # pixel optimisation, without / with the competition term
DEFAULT_L_ADV = 1.0
MAX_SEED = 2**63 - 1  # torch.manual_seed takes seed + rank as a 64-bit integer
# The deepest CIFAR ResNet published (He et al. 2016: 1202 layers). Deeper stacks are a typo,
# and merely describing one takes ~1.5 ms per layer before the memory check can answer.
MAX_DEPTH = 1202
# Record fields known to users by another flag (the rest: the field with dashes).
FLAGS = {"arch": "teacher", "family": "student", "steps": "synthesis-steps", "lr": "synthesis-lr",
         "method": "synthesizer", "compile": "compile-synthesis", "eval_data": "data"}
# How the student is trained: "direct" (KD of the spiking student, interleaved with synthesis)
# or "twin" (synthesis first, then KD of its rate twin: students/rate.py; measured on CIFAR-10,
# benchmarks/README.md). "auto" chooses twin where the student has a twin and the teacher's
# images are at least TWIN_MIN_SIDE pixels on their shorter side, direct otherwise; the twin
# route then also takes TWIN_DEFAULTS for every option the user did not give.
STRATEGIES = ("auto", "direct", "twin")
TWIN_MIN_SIDE = 32
DEFAULT_SYNTHESIS_FRACTION = 0.75  # twin: the budget's share that synthesises before the KD phase; CIFAR-10
# ResNet-20, 20 min on 2 CPU cores: 0.75 gave 33.5 %, 0.45 gave 30.3 % (KD saturates on few images)
# Lever b of issue 13, the twin's hand-over: 50 KD steps (128 images each, ~22 s on a 2-core
# CPU) of the finished 20-min students as spiking networks at this fixed rate gave +1.1, +3.4
# (rca, seeds 0 and 1) and +5.9 points (host, seed 1) on all 10,000 JPEG images.
# End to end, the default + a spiking fraction of 0.02, 20 min, all 10,000 images: +0.4 / +2.0
# points (seeds 0 / 1, EPYC with avx512_bf16) and +2.0 (seed 0, an AVX2-only EPYC: 38.5 -> 40.5 %).
DEFAULT_SPIKING_LR = 2e-5
DEFAULT_SPIKING_FRACTION = 0.02  # twin default (TWIN_DEFAULTS); the direct route trains the spiking student throughout
SPIKING_STEPS_PER_ROUND = 5  # KD steps per round in that phase (~2 s each round on a 2-core CPU)
TWIN_DEFAULTS = {"kd_mix": "both", "kd_steps": 50, "channels_last": True, "compile_student": True,
                 "spiking_fraction": DEFAULT_SPIKING_FRACTION}
TWIN_SYNTHESIS_DEFAULTS = {"steps": 200, "init": "smooth", "compile": "default"}
# What a manifest's config must name: the rest may fall back to its default.
REQUIRED = ("teacher", "student", "synthesis")
NESTED_REQUIRED = {"teacher": ("arch",), "student": ("family", "input_shape", "num_classes", "lif")}


@dataclass(frozen=True)
class DistillConfig:
    teacher: TeacherSpec = field(default_factory=TeacherSpec)
    student: StudentConfig = field(default_factory=StudentConfig)
    synthesis: SynthesisConfig = field(default_factory=SynthesisConfig)
    objective: str = "host"
    rounds: int | None = None
    budget_s: float | None = DEFAULT_BUDGET_S
    kd_steps: int = 10
    kd_batch_size: int = 128
    kd_lr: float = 2e-3
    kd_temperature: float = 20.0
    kd_mode: str = "mean"
    b_rca: float = 0.0
    seed: int = 0
    eval_data: str | None = "digits"
    eval_every: int = 10
    checkpoint_every: int = 5
    pool_memory_mb: float = 1024.0
    device: str = "auto"
    lif_kernel: str = "auto"  # norse, fused, compiled; auto: compiled on CUDA, norse on the CPU (neurons.py)
    channels_last: bool = False  # NHWC memory layout for the teacher's and the student's convolutions
    strategy: str = "direct"  # direct or twin (STRATEGIES; make_config resolves "auto")
    synthesis_fraction: float = DEFAULT_SYNTHESIS_FRACTION  # twin: the budget's share of the synthesis phase
    spiking_fraction: float = 0.0  # twin: the budget's last share, KD of the spiking student itself (0: none)
    spiking_lr: float = DEFAULT_SPIKING_LR  # its Adam learning rate (fixed: the twin's cosine has ended by then)
    kd_mix: str = "none"  # mix the KD minibatches: none, mixup, cutmix, both (augment.mix_batch)
    kd_bf16: bool = False  # the KD forward passes (teacher and student) under bfloat16 autocast
    compile_student: bool = False  # torch.compile the model the KD steps train (the twin: ~2x on a CPU)
    snapshot_every_s: float | None = None  # keep the student every S seconds of distillation (RUN_DIR/snapshots)

    def __post_init__(self):
        # types and finiteness first: NaN passes every `<` comparison below (--kd-lr nan)
        for record in (self.teacher, self.student, self.student.lif, self.synthesis, self):
            check_record(record, flags=FLAGS)
        if self.rounds is None and self.budget_s is None:
            raise ConfigError("give a budget: --rounds N and/or --budget-s SECONDS")
        if self.rounds is not None and self.rounds < 1:
            raise ConfigError(f"--rounds must be at least 1, got {self.rounds}")
        if self.budget_s is not None and not self.budget_s > 0:
            raise ConfigError(f"--budget-s must be a positive number of seconds, got {self.budget_s}")
        for name in ("kd_steps", "kd_batch_size", "eval_every", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        for name in ("kd_lr", "kd_temperature", "pool_memory_mb"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if not self.b_rca >= 0:
            raise ConfigError(f"--b-rca must be >= 0, got {self.b_rca}")
        if not self.student.lif.surrogate_alpha > 0:
            raise ConfigError(f"--surrogate-alpha must be positive, got {self.student.lif.surrogate_alpha}")
        if self.student.depth > MAX_DEPTH:
            raise ConfigError(f"--depth {self.student.depth}: at most {MAX_DEPTH} layers")
        if not 0 <= self.seed <= MAX_SEED:
            raise ConfigError(f"--seed must be in 0..{MAX_SEED}, got {self.seed}")
        if self.lif_kernel not in LIF_KERNELS:
            raise ConfigError(f"--lif-kernel {self.lif_kernel!r}: choose one of {', '.join(LIF_KERNELS)}")
        if self.kd_mode not in KD_MODES:
            raise ConfigError(f"--kd-mode {self.kd_mode!r}: choose one of {', '.join(KD_MODES)}")
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"--objective {self.objective!r}: choose one of {', '.join(OBJECTIVES)}")
        if self.device not in DEVICE_CHOICES and not self.device.startswith("cuda:"):
            raise ConfigError(f"--device {self.device!r}: use auto, cpu, cuda or cuda:N")
        if self.student.input_shape != self.teacher.input_shape or self.student.num_classes != self.teacher.num_classes:
            raise ConfigError("the student's input shape and classes must match the teacher's")
        if self.strategy not in STRATEGIES[1:]:
            raise ConfigError(f"--strategy {self.strategy!r}: choose one of {', '.join(STRATEGIES)}")
        if self.strategy == "twin":
            check_twin(self.student)
        if not 0 < self.synthesis_fraction < 1:
            raise ConfigError(f"--synthesis-fraction must be between 0 and 1, got {self.synthesis_fraction}")
        if not 0 <= self.spiking_fraction < 1 - self.synthesis_fraction or not self.spiking_lr > 0:
            raise ConfigError(f"--spiking-fraction must be in [0, 1 - --synthesis-fraction) = [0, "
                              f"{1 - self.synthesis_fraction:g}) and --spiking-lr positive, got "
                              f"{self.spiking_fraction} and {self.spiking_lr}")
        if self.spiking_fraction > 0 and self.strategy != "twin":
            raise ConfigError("--spiking-fraction fine-tunes the spiking student after its rate twin: it needs "
                              "--strategy twin (the direct route trains the spiking student throughout)")
        if self.synthesis.l_tar_student > 0 and self.student.lif.tau_syn_steps is not None:
            raise ConfigError("--l-tar-student compares a current-free LIF's membrane with its threshold: drop "
                              "--tau-syn-steps or --l-tar-student")
        if self.kd_mix not in MIX_MODES:
            raise ConfigError(f"--kd-mix {self.kd_mix!r}: choose one of {', '.join(MIX_MODES)}")
        if self.snapshot_every_s is not None and not self.snapshot_every_s > 0:
            raise ConfigError(f"--snapshot-every-s must be a positive number of seconds, got {self.snapshot_every_s}")

    def to_dict(self) -> dict:
        values = asdict(self)
        values["teacher"]["class_names"] = list(self.teacher.class_names)
        values["student"] = self.student.to_dict()
        values["synthesis"] = self.synthesis.to_dict()
        return values

    @classmethod
    def from_dict(cls, values: dict) -> "DistillConfig":
        values = dict(values)
        teacher = dict(values.pop("teacher"))
        teacher["class_names"] = tuple(teacher.get("class_names", ()))
        synthesis = dict(values.pop("synthesis"))
        if "tar_ks" in synthesis:
            synthesis["tar_ks"] = tuple(synthesis["tar_ks"])
        return cls(teacher=TeacherSpec(**teacher), student=StudentConfig.from_dict(values.pop("student")),
                   synthesis=SynthesisConfig(**synthesis), **values)


def check_twin(student: StudentConfig) -> None:
    """Refuse the twin strategy for a student that has no rate twin."""
    from stars_deploy.students import student_family
    from stars_deploy.students.rate import check_rate_twin

    if student_family(student.family).rate_forward is None:
        raise ConfigError(f"--strategy twin: the {student.family} student has no rate twin (only convnet has one); "
                          "use --strategy direct")
    check_rate_twin(student.lif)


def resolve_strategy(strategy: str, teacher: TeacherSpec, student: StudentConfig) -> str:
    """``auto``: twin for a student that has a twin and a teacher of images at least
    TWIN_MIN_SIDE pixels on their shorter side (CIFAR-sized and up), direct otherwise."""
    if strategy != "auto":
        return strategy
    try:
        check_twin(student)
    except ConfigError:
        return "direct"
    return "twin" if min(teacher.input_shape[1:]) >= TWIN_MIN_SIDE else "direct"


def make_config(objective: str = AUTO_OBJECTIVE, teacher: TeacherSpec | None = None, student: dict | None = None,
                synthesis: dict | None = None, host: str = "deepinversion", lif: dict | None = None,
                eval_data: str | None = "auto", **options) -> DistillConfig:
    """A DistillConfig from an objective shorthand (or ``auto``: TWIN_OBJECTIVE on the twin
    route, DIRECT_OBJECTIVE on the direct route) plus explicit overrides.

    ``student`` holds StudentConfig fields (input shape and classes come from the teacher),
    ``lif`` LIFConfig fields, ``synthesis`` SynthesisConfig fields. An explicit
    ``l_rca``/``l_tar`` (in synthesis) or ``b_rca`` overrides what the objective switches on;
    ``host="adi"`` switches the competition term on (l_adv = DEFAULT_L_ADV) unless given.
    ``eval_data="auto"`` evaluates on the held-out digits for the digits teacher and on
    nothing otherwise; None never evaluates. The generator host (``synthesis={"method":
    "generator"}``) takes GENERATOR_STEPS steps per batch unless ``steps`` is given.
    ``strategy="auto"`` (resolve_strategy) may choose the twin route, whose TWIN_DEFAULTS and
    TWIN_SYNTHESIS_DEFAULTS then fill every option not given.
    """
    if objective not in OBJECTIVES and objective != AUTO_OBJECTIVE:
        raise ConfigError(f"--objective {objective!r}: choose one of {AUTO_OBJECTIVE}, {', '.join(OBJECTIVES)}")
    if host not in HOSTS:
        raise ConfigError(f"--host {host!r}: choose one of {', '.join(HOSTS)}")
    teacher = teacher or TeacherSpec()
    synthesis = {key: value for key, value in (synthesis or {}).items() if value is not None}
    if host == "adi":
        synthesis.setdefault("l_adv", DEFAULT_L_ADV)
    if synthesis.get("method") == "generator":
        synthesis.setdefault("steps", GENERATOR_STEPS)
        synthesis.setdefault("lr", GENERATOR_Z_LR)
    student = {key: value for key, value in (student or {}).items() if value is not None}
    lif = {key: value for key, value in (lif or {}).items() if value is not None}
    if lif:
        student["lif"] = LIFConfig(**lif)
    student_config = StudentConfig(input_shape=teacher.input_shape, num_classes=teacher.num_classes, **student)
    options["strategy"] = resolve_strategy(options.get("strategy") or "auto", teacher, student_config)
    if objective == AUTO_OBJECTIVE:
        objective = TWIN_OBJECTIVE if options["strategy"] == "twin" else DIRECT_OBJECTIVE
    weights = dict(OBJECTIVES[objective])
    weights.update({k: synthesis.pop(k) for k in ("l_rca", "l_tar") if k in synthesis})
    if options.get("b_rca") is not None:
        weights["b_rca"] = options.pop("b_rca")
    options.pop("b_rca", None)
    if options["strategy"] == "twin":
        for key, value in TWIN_DEFAULTS.items():
            options[key] = value if options.get(key) is None else options[key]
        for key, value in TWIN_SYNTHESIS_DEFAULTS.items():
            synthesis.setdefault(key, value)
        if options.get("kd_bf16") is None:
            options["kd_bf16"] = "auto"
    if options.get("kd_bf16") == "auto":
        options["kd_bf16"] = fast_bf16(options.get("device") or "auto")
    synthesis_config = SynthesisConfig(l_rca=weights["l_rca"], l_tar=weights["l_tar"], **synthesis)
    if eval_data == "auto":
        eval_data = "digits" if teacher.arch == "digits_cnn" else None
    return DistillConfig(teacher=teacher, student=student_config, synthesis=synthesis_config,
                         objective=objective, b_rca=weights["b_rca"], eval_data=eval_data,
                         **{k: v for k, v in options.items() if v is not None or k in ("rounds", "budget_s")})


def config_from_manifest(manifest: dict, source: Path) -> DistillConfig:
    """The DistillConfig of a manifest that :func:`read_manifest` accepted: every field of its
    ``config`` checked for its type first, then the record's own ranges; a CheckpointError
    names ``source`` and the key."""
    try:
        check_table(DistillConfig, manifest["config"], "config", REQUIRED, NESTED_REQUIRED)
        return DistillConfig.from_dict(manifest["config"])
    except ConfigError as exc:
        raise CheckpointError(f"run manifest {source}: {exc}; restore the file or distil the run again") from None


def read_run_config(run_dir: Path) -> DistillConfig:
    """The configuration a run was distilled with (its manifest, checked)."""
    return config_from_manifest(read_manifest(run_dir), Path(run_dir) / MANIFEST)
