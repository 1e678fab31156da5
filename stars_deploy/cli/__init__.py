"""The ``stars-deploy`` command line: it parses options and calls one library function each.

This entry module only builds the group and registers the commands of its sibling modules
(distill, convert, teacher, deploy: export and simulate, ci: check, report, pipeline, doctor); they share
common.py and never import this module.

Every error the user can fix (a StarsDeployError, or click's own usage errors) prints one
line, ``stars-deploy: error: ...``, on stderr and exits with code 2; with ``--json`` it also
prints one JSON object ``{"error": ...}`` on stdout. Results go to stdout, progress and logs
to stderr.

Exit codes: 0 success, 1 a gate failed (check, pipeline) or a required part is broken (doctor), 2 a
usage or input error, 3 an internal error (a bug), 130 / 143 interrupted by SIGINT / SIGTERM
(interrupt.py).
"""

from __future__ import annotations

import os
import sys

import click

from stars_deploy.version import __version__
from stars_deploy.errors import StarsDeployError
from stars_deploy.interrupt import HardStop, Interrupted, exit_code, signal_name
from stars_deploy.progress import set_quiet, set_verbose, verbose

from .ci import check, pipeline, report
from .common import to_json
from .convert import convert
from .deploy import export, simulate
from .doctor import doctor
from .distill import distill
from .teacher import teacher

USAGE_ERROR = 2
INTERNAL_ERROR = 3  # a bug, not the user's input: the one-line message asks for -v and a report
INTERRUPTED = 130  # SIGINT outside a run's safe points (a run itself says 130 or 143: interrupt.py)
DEBUG_ENV = "STARS_DEPLOY_DEBUG"  # set to 1: internal errors raise with their traceback (as -v does)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, "--version", package_name="stars-deploy", prog_name="stars-deploy")
@click.option("-q", "--quiet", is_flag=True, help="No progress or log lines on stderr.")
@click.option("-v", "--verbose", is_flag=True, help="More log lines on stderr, and a traceback for internal errors.")
def cli(quiet, verbose):
    """Data-free distillation of ANN teachers into spiking students, and their deployment."""
    set_quiet(quiet)
    set_verbose(verbose)


for _command in (distill, convert, teacher, export, simulate, check, report, pipeline, doctor):
    cli.add_command(_command)


def _fail(message: str, as_json: bool, code: int = USAGE_ERROR):
    click.echo(f"stars-deploy: error: {message}", err=True)
    if as_json:
        click.echo(to_json({"error": message}))
    sys.exit(code)


def _usage_message(exc: click.UsageError) -> str:
    command = exc.ctx.command_path if exc.ctx is not None else "stars-deploy"
    return f"{exc.format_message()} (see `{command} --help`)"


def main(argv: list[str] | None = None) -> None:
    """Console entry point: one-line errors with exit code 2, no tracebacks for user errors."""
    args = sys.argv[1:] if argv is None else list(argv)
    as_json = "--json" in args
    try:
        code = cli.main(args=args, prog_name="stars-deploy", standalone_mode=False)
    except click.exceptions.Abort:
        _fail("interrupted", as_json, INTERRUPTED)
    except click.UsageError as exc:
        _fail(_usage_message(exc), as_json)
    except click.ClickException as exc:
        _fail(exc.format_message(), as_json, exc.exit_code)
    except Interrupted as exc:
        _fail(str(exc), as_json, exc.exit_code)
    except HardStop as stop:  # a third signal while the second one's message was being made
        _fail(f"stopped by {signal_name(stop.signum)}", as_json, exit_code(stop.signum))
    except StarsDeployError as exc:
        _fail(str(exc), as_json)
    except Exception as exc:
        peer = _peer_failure(exc)
        if peer is not None:
            _fail(str(peer), as_json)  # not the write it interrupted
        if verbose() or os.environ.get(DEBUG_ENV) == "1":
            raise
        reason = str(exc).splitlines()[0] if str(exc) else ""
        _fail(f"internal error: {type(exc).__name__}: {reason} (a bug: rerun with -v for the traceback and "
              "report it)", as_json, INTERNAL_ERROR)
    sys.exit(code if isinstance(code, int) else 0)


def _peer_failure(exc: BaseException):
    """The PeerError behind ``exc``, if ``exc`` was raised while handling one: torchrun's
    SIGTERM can land inside a library call (a torch.save, say) whose own clean-up then fails."""
    from stars_deploy.distillation.distributed import PeerError

    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, PeerError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None
