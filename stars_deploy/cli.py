"""The ``stars-deploy`` command line: it parses options and calls one library function each.

Errors the user can fix (StarsDeployError) print one line on stderr and exit with code 2;
``--json`` prints exactly one JSON object on stdout, progress and logs go to stderr.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from .errors import StarsDeployError
from .progress import set_quiet

DEFAULT_BUDGET_S = 90.0


def emit(payload: dict, as_json: bool, rows: list[tuple[str, str]]) -> None:
    """Print ``payload`` as one JSON object, or ``rows`` as an aligned two-column table."""
    if as_json:
        click.echo(json.dumps(payload, sort_keys=True, default=str))
        return
    width = max(len(label) for label, _ in rows)
    for label, value in rows:
        click.echo(f"{label:<{width}}  {value}")


def percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f} %"


json_option = click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
quiet_option = click.option("--quiet", is_flag=True, help="No progress or log lines on stderr.")


def teacher_options(function):
    """--teacher/--weights/--normalization/--num-classes, shared by every command that loads one."""
    from .teachers import ARCHITECTURES

    options = [
        click.option("--teacher", "arch", default="digits_cnn", show_default=True,
                     help=f"Teacher architecture: {', '.join(ARCHITECTURES)}."),
        click.option("--weights", type=click.Path(path_type=Path), default=None,
                     help="Teacher checkpoint (state_dict; 'module.' prefix is fine). "
                          "Default: the cached digits teacher."),
        click.option("--normalization", default="",
                     help="Input normalisation: imagenet, cifar10, cifar100, digits, none, or "
                          "'m1,m2,m3/s1,s2,s3'. Default: the architecture's."),
        click.option("--num-classes", type=int, default=10, show_default=True),
    ]
    for option in reversed(options):
        function = option(function)
    return function


def make_teacher_spec(arch: str, weights: Path | None, normalization: str, num_classes: int):
    from .teachers import TeacherSpec

    spec = TeacherSpec(arch=arch, weights=str(weights) if weights else None,
                       normalization=normalization, num_classes=num_classes)
    spec.mean_std  # validate the normalisation now, not mid-run
    if weights is None and arch != "digits_cnn":
        raise click.UsageError(f"--teacher {arch} needs --weights PATH (only digits_cnn has a cached default)")
    return spec


def distill_config(arch, weights, normalization, num_classes, family, width, depth, timesteps, tau_mem_steps,
                   tau_syn_steps, surrogate, surrogate_alpha, objective, host, method, generator_lr, generator_meta,
                   bn_groups, bn_momentum, rounds, budget_s, batch_size, synthesis_steps, synthesis_lr, l_bn,
                   l_ce, l_adv, l_tv, l_l2, l_rca, l_tar, b_rca, rca_variant, student_every, kd_steps, kd_batch_size,
                   kd_lr, kd_temperature, kd_mode, seed, eval_data, no_eval, eval_every, checkpoint_every,
                   pool_memory_mb, device, teacher_bf16, channels_last, lif_kernel, compile_synthesis):
    """The DistillConfig for `distill`'s options (also used by `pipeline` for its [distill] table)."""
    from .distill import make_config

    spec = make_teacher_spec(arch, weights, normalization, num_classes)
    if family == "resnet":
        width, depth = width or 16, depth or 8
    if budget_s is None and rounds is None:
        budget_s = DEFAULT_BUDGET_S
    return make_config(
        objective, teacher=spec, host=host,
        student={"family": family, "width": width, "depth": depth, "timesteps": timesteps},
        lif={"tau_mem_steps": tau_mem_steps, "tau_syn_steps": tau_syn_steps, "surrogate": surrogate,
             "surrogate_alpha": surrogate_alpha},
        synthesis={"batch_size": batch_size, "steps": synthesis_steps, "lr": synthesis_lr, "l_bn": l_bn,
                   "l_ce": l_ce, "l_adv": l_adv, "l_tv": l_tv, "l_l2": l_l2, "l_rca": l_rca,
                   "l_tar": l_tar, "rca_variant": rca_variant, "student_every": student_every,
                   "method": method, "generator_lr": generator_lr, "generator_meta": generator_meta,
                   "bn_momentum": bn_momentum, "teacher_bf16": teacher_bf16,
                   "bn_groups": bn_groups, "compile": compile_synthesis},
        rounds=rounds, budget_s=budget_s, b_rca=b_rca, kd_steps=kd_steps, kd_batch_size=kd_batch_size,
        kd_lr=kd_lr, kd_temperature=kd_temperature, kd_mode=kd_mode, seed=seed,
        eval_data=None if no_eval else (eval_data or "auto"), eval_every=eval_every,
        checkpoint_every=checkpoint_every, pool_memory_mb=pool_memory_mb, device=device,
        channels_last=channels_last, lif_kernel=lif_kernel)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="stars-deploy")
def cli():
    """Data-free distillation of ANN teachers into spiking students, and their deployment."""


@cli.command()
@teacher_options
@click.option("--student", "family", default="convnet", show_default=True,
              help="Student family: convnet (feed-forward, Loihi-deployable) or resnet (spiking ResNet).")
@click.option("--width", type=int, default=None, help="Channels of the first layer [32 convnet, 16 resnet].")
@click.option("--depth", type=int, default=None, help="Conv layers (convnet) or 6n+2 (resnet) [3 / 8].")
@click.option("--timesteps", "-T", type=int, default=4, show_default=True)
@click.option("--tau-mem-steps", type=float, default=None, help="Membrane time constant in steps [2].")
@click.option("--tau-syn-steps", type=float, default=None, help="Synaptic time constant in steps (CUBA); none by default.")
@click.option("--surrogate", default=None, help="Surrogate gradient: super, triangle, tanh, circ, heavi_erfc [super].")
@click.option("--surrogate-alpha", type=float, default=None, help="Surrogate sharpness [10].")
@click.option("--objective", default="host", show_default=True,
              help="host (BN + CE), rca, tar, or stars (host + RCA + TAR).")
@click.option("--host", default="deepinversion", show_default=True,
              help="deepinversion (pixel optimisation) or adi (plus the competition term).")
@click.option("--synthesizer", "method", default=None,
              help="pixel (optimise the pixels of each batch) or generator (FastDFKD: a generator "
                   "meta-learned across batches) [pixel].")
@click.option("--generator-lr", type=float, default=None, help="Generator host: inner learning rate [4e-3].")
@click.option("--generator-meta", default=None,
              help="Generator host: meta gradient, reptile (G - G') or fomaml (first-order MAML) [reptile].")
@click.option("--bn-momentum", type=float, default=None,
              help="FastDFKD's BN momentum m: L_BN matches each batch's statistics blended with a running "
                   "average of earlier batches [0].")
@click.option("--bn-groups", type=int, default=None,
              help="Optimise the synthetic batch as G independent batches, each matched to the BN "
                   "statistics on its own (--batch-size 1024 --bn-groups 4 = four batches of 256 at once) [1].")
@click.option("--rounds", type=int, default=None, help="Budget in synthesise->KD rounds.")
@click.option("--budget-s", type=float, default=None,
              help=f"Budget in wall-clock seconds of distillation [{DEFAULT_BUDGET_S:g} when --rounds is not given].")
@click.option("--batch-size", type=int, default=None, help="Synthetic images per batch [128].")
@click.option("--synthesis-steps", type=int, default=None, help="Adam steps per synthetic batch [50 pixel, 5 generator].")
@click.option("--synthesis-lr", type=float, default=None, help="Learning rate of the pixels (or of z) [0.1].")
@click.option("--l-bn", type=float, default=None, help="Weight of L_BN [1].")
@click.option("--l-ce", type=float, default=None, help="Weight of L_CE [1].")
@click.option("--l-adv", type=float, default=None, help="Weight of the competition term [0; 1 with --host adi].")
@click.option("--l-tv", type=float, default=None, help="Weight of total variation [1e-4].")
@click.option("--l-l2", type=float, default=None, help="Weight of the pixel L2 prior [0].")
@click.option("--l-rca", type=float, default=None, help="Weight of L_RCA in synthesis [objective's].")
@click.option("--l-tar", type=float, default=None, help="Weight of L_TAR in synthesis [objective's].")
@click.option("--b-rca", type=float, default=None, help="Weight of L_RCA in the student loss [objective's].")
@click.option("--rca-variant", default=None, help="gram (cosine Gram), sp or rkd [gram].")
@click.option("--student-every", type=int, default=None,
              help="Run the student for RCA/ADV every k synthesis steps (always the last) [10].")
@click.option("--kd-steps", type=int, default=None, help="Student steps per round [10].")
@click.option("--kd-batch-size", type=int, default=None, help="Student minibatch [128].")
@click.option("--kd-lr", type=float, default=None, help="Student Adam learning rate [2e-3].")
@click.option("--kd-temperature", type=float, default=None, help="KD temperature tau [20].")
@click.option("--kd-mode", default=None, help="mean (KL on time-averaged logits) or per_step [mean].")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--eval-data", default=None,
              help="digits, a .npz (images N,H,W,C uint8 + labels) or a CIFAR pickle folder "
                   "[digits for the digits teacher].")
@click.option("--no-eval", is_flag=True, help="Skip evaluation.")
@click.option("--eval-every", type=int, default=None, help="Evaluate every N rounds [10].")
@click.option("--checkpoint-every", type=int, default=None, help="Checkpoint every N rounds [5].")
@click.option("--pool-memory-mb", type=float, default=None, help="Pool memory before spilling to disk [1024].")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--teacher-bf16", is_flag=True, default=None, help="Run the teacher under bfloat16 autocast.")
@click.option("--channels-last", is_flag=True, default=None, help="NHWC memory layout for the convolutions.")
@click.option("--lif-kernel", default="auto", show_default=True,
              help="Student LIF layers: norse (step Norse's cell), fused (one autograd node), compiled "
                   "(torch.compile'd fused kernels); auto: compiled on CUDA, norse on the CPU.")
@click.option("--compile-synthesis", default=None,
              help="torch.compile the teacher side of the synthesis objective: none, default, or "
                   "reduce-overhead (also CUDA graphs on a GPU) [none]. Compiling takes ~10-70 s once.")
@click.option("--runs-dir", type=click.Path(path_type=Path), default=Path("runs"), show_default=True)
@click.option("--name", "run_name", default=None, help="Run directory name [derived from the config].")
@click.option("--resume", type=click.Path(path_type=Path), default=None,
              help="Continue the run in this directory from its last checkpoint (other options ignored).")
@json_option
@quiet_option
def distill(runs_dir, run_name, resume, as_json, quiet, **options):
    """Distil a spiking student from a teacher alone. With no options: the embedded default
    (digits teacher -> spiking convnet -> evaluation on held-out digits). Under
    `torchrun --nproc-per-node N -m stars_deploy distill ...` the N processes distil together
    and rank 0 alone writes the run and prints the result."""
    from .distill import distill as run_distill
    from .distributed import launch_rank

    set_quiet(quiet)
    config = None if resume is not None else distill_config(**options)
    summary = run_distill(config, runs_dir=runs_dir, run_name=run_name, resume=resume)
    if launch_rank() != 0:
        return
    emit(summary, as_json, [
        ("teacher accuracy", percent(summary.get("teacher_accuracy"))),
        ("student accuracy", percent(summary.get("student_accuracy"))),
        ("agreement", percent(summary.get("agreement"))),
        ("synthetic images", f"{summary['synthetic_images']:,}"),
        ("rounds", str(summary["rounds"])),
        ("wall time", f"{summary['wall_time_s']:.1f} s"),
        ("run directory", summary["run_dir"]),
    ])


@cli.group()
def teacher():
    """Train the digits teacher, evaluate or list teachers."""


@teacher.command("train")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Where to save it [the cache: $STARS_DEPLOY_CACHE or ~/.cache/stars-deploy].")
@click.option("--epochs", type=int, default=40, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@json_option
@quiet_option
def teacher_train(out, epochs, seed, as_json, quiet):
    """Train the digits BatchNorm CNN (seconds on a CPU) and cache it for `distill`."""
    from .teacher_training import train_digits_teacher

    set_quiet(quiet)
    if epochs < 1:
        raise click.UsageError("--epochs must be at least 1")
    summary = train_digits_teacher(out, epochs=epochs, seed=seed)
    emit(summary, as_json, [("test accuracy", percent(summary["test_accuracy"])),
                            ("wall time", f"{summary['wall_time_s']:.1f} s"), ("saved to", summary["path"])])


@teacher.command("eval")
@teacher_options
@click.option("--data", default=None, help="digits, a .npz file or a CIFAR folder [digits].")
@click.option("--samples", type=int, default=None, help="Only the first N images.")
@click.option("--device", default="auto", show_default=True)
@json_option
@quiet_option
def teacher_eval(arch, weights, normalization, num_classes, data, samples, device, as_json, quiet):
    """Accuracy of a teacher on a data set."""
    from .teacher_ops import evaluate_teacher

    set_quiet(quiet)
    spec = make_teacher_spec(arch, weights, normalization, num_classes)
    summary = evaluate_teacher(spec, data or "digits", samples, device)
    emit(summary, as_json, [("teacher", summary["teacher"]), ("data", summary["data"]),
                            ("images", str(summary["images"])), ("accuracy", percent(summary["accuracy"]))])


@teacher.command("list")
@json_option
def teacher_list(as_json):
    """The registered teacher architectures."""
    from .teachers import ARCHITECTURES

    payload = {name: {"input_shape": list(a.input_shape), "normalization": a.normalization}
               for name, a in ARCHITECTURES.items()}
    emit({"architectures": payload}, as_json,
         [(name, f"input {tuple(v['input_shape'])}, normalisation {v['normalization']}") for name, v in payload.items()])


def main(argv: list[str] | None = None) -> None:
    """Console entry point: one-line errors with exit code 2, no tracebacks for user errors."""
    try:
        code = cli.main(args=argv, prog_name="stars-deploy", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except StarsDeployError as exc:
        click.echo(f"stars-deploy: error: {exc}", err=True)
        sys.exit(2)
    except Exception as exc:
        peer = _peer_failure(exc)
        if peer is None:
            raise
        click.echo(f"stars-deploy: error: {peer}", err=True)  # not the write it interrupted
        sys.exit(2)
    sys.exit(code if isinstance(code, int) else 0)


def _peer_failure(exc: BaseException):
    """The PeerError behind ``exc``, if ``exc`` was raised while handling one: torchrun's
    SIGTERM can land inside a library call (a torch.save, say) whose own clean-up then fails."""
    from .distributed import PeerError

    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, PeerError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


# export/simulate live in deploy_cli, which reuses emit() and the shared options above
from .deploy_cli import export as _export, simulate as _simulate  # noqa: E402

cli.add_command(_export)
cli.add_command(_simulate)

from .ci_cli import check as _check, pipeline as _pipeline, report as _report  # noqa: E402

cli.add_command(_check)
cli.add_command(_report)
cli.add_command(_pipeline)
