"""What every command shares: output (one JSON object or a table), option building from the
library's schemas, help grouped by topic, hidden old spellings, and the run directory.

Commands print results on stdout and progress and logs on stderr; ``--json`` prints exactly
one JSON object on stdout (never a bare NaN: non-finite numbers become null).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable, Sequence

import click

from stars_deploy.devices import DEFAULT_DEVICE
from stars_deploy.distillation.options import Option
from stars_deploy.progress import set_quiet
from stars_deploy.units import text_table

OTHER_GROUP = "Other options"


def finite(value: Any) -> Any:
    """``value`` with every non-finite float replaced by None (JSON has no NaN or Infinity)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(item) for item in value]
    return value


def to_json(payload: Any) -> str:
    return json.dumps(finite(payload), sort_keys=True, default=str, allow_nan=False)


def emit(payload: dict, as_json: bool, rows: list[tuple[str, str]]) -> None:
    """Print ``payload`` as one JSON object, or ``rows`` as an aligned two-column table."""
    if as_json:
        click.echo(to_json(payload))
        return
    width = max(len(label) for label, _ in rows)
    for label, value in rows:
        click.echo(f"{label:<{width}}  {value}")


def table(header: tuple, rows: list[tuple]) -> None:
    """An aligned text table with a header row."""
    for line in text_table(header, rows):
        click.echo(line)


def run_dir_or_latest(run_dir: Path | None, runs_dir: Path) -> Path:
    """RUN_DIR when given, else the newest finished run under ``runs_dir`` (said on stderr).
    A run directory is checked before any command reads it: its manifest against the schema
    (runs.py, distillation/config.py), and temporary files a killed writer left are removed."""
    from stars_deploy.progress import log
    from stars_deploy.runs import latest_run

    if run_dir is None:
        run_dir = latest_run(runs_dir)
        log(f"using the latest run: {run_dir}")
    return open_run_dir(run_dir)


def open_run_dir(path: Path) -> Path:
    """``path`` unchanged; when it is a run directory (it has a manifest), the manifest is
    checked and orphaned temporary files are removed first."""
    from stars_deploy.distillation.config import read_run_config
    from stars_deploy.layout import MANIFEST
    from stars_deploy.progress import log
    from stars_deploy.runs import open_run

    if Path(path).is_dir() and (Path(path) / MANIFEST).exists():
        read_run_config(path)
        for orphan in open_run(path):
            log(f"removed {orphan}, a temporary file left by a killed write")
    return path


def inside_working_directory(path: Path, option: str) -> Path:
    """An output path from the command line: absolute as given, or relative and inside the
    working directory (``../x`` may not write outside it)."""
    path = Path(path)
    if path.is_absolute():
        return path
    here = Path.cwd().resolve()
    target = (here / path).resolve()
    if target != here and here not in target.parents:
        raise click.BadParameter(f"{str(path)!r} is outside the working directory; give an absolute path to "
                                 "write there", param_hint=option)
    return path


# ---- options --------------------------------------------------------------------------------
class FiniteFloatRange(click.FloatRange):
    """click's FloatRange, which lets NaN through (every comparison with NaN is false), with
    NaN and infinities refused."""

    name = "finite float range"

    def convert(self, value, param, ctx):
        number = super().convert(value, param, ctx)
        if number is not None and not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number


FINITE_FLOAT = FiniteFloatRange()
POSITIVE_FLOAT = FiniteFloatRange(min=0.0, min_open=True)

class TopicOption(click.Option):
    """A click option with a help topic and hidden old spellings: ``aliases`` parse like the
    option's own flags but are left out of ``--help``."""

    def __init__(self, *args, topic: str = OTHER_GROUP, aliases: Sequence[str] = (), **kwargs):
        decls = list(args[0]) + [f"--{alias}" for alias in aliases]
        super().__init__(decls, *args[1:], **kwargs)
        self.topic = topic
        self.hidden_opts = {f"--{alias}" for alias in aliases}

    def get_help_record(self, ctx):
        shown = self.opts, self.secondary_opts
        self.opts = [opt for opt in self.opts if opt not in self.hidden_opts]
        try:
            record = super().get_help_record(ctx)
        finally:
            self.opts, self.secondary_opts = shown
        if record is None:
            return None
        flags, text = record  # one way to show every default: [default: 2], never [default: (2)]
        if isinstance(self.show_default, str):
            text = text.replace(f"[default: ({self.show_default})]", f"[default: {self.show_default}]")
        return flags, text


class LazyChoice(click.Choice):
    """A Choice whose choices are read from a registry when the command line is parsed, so a
    target or family registered at run time is accepted and listed."""

    def __init__(self, choices: Callable[[], Sequence[str]]):
        self._source = choices
        super().__init__([], case_sensitive=True)

    @property
    def choices(self):
        return list(self._source())

    @choices.setter
    def choices(self, value):
        pass


class TopicCommand(click.Command):
    """A command whose --help lists its options under topic headings, in the order the topics
    first appear."""

    def format_options(self, ctx, formatter):
        sections: dict[str, list] = {}
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is not None:
                sections.setdefault(getattr(param, "topic", OTHER_GROUP), []).append(record)
        for topic, records in sections.items():
            with formatter.section(topic):
                formatter.write_dl(records)


def option(*flags: str, topic: str = OTHER_GROUP, aliases: Sequence[str] = (), **kwargs):
    """``click.option`` with a help topic and hidden aliases; defaults are always shown."""
    kwargs.setdefault("show_default", True)
    return click.option(*flags, cls=TopicOption, topic=topic, aliases=aliases, **kwargs)


def click_type(spec: Option):
    choices = spec.choices
    if choices is not None:
        return LazyChoice(choices) if callable(choices) else click.Choice(list(choices))
    if spec.kind is Path:
        return click.Path(path_type=Path)
    return spec.kind


def schema_options(specs: Sequence[Option]):
    """A decorator adding one click option per schema entry (distillation/options.py)."""
    def decorate(function):
        for spec in reversed(specs):
            flags = [f"--{spec.flag}"] + ([spec.short] if spec.short else [])
            if spec.kind is bool and spec.default is None:  # three states: on, off, or the library decides
                flags[0] = f"--{spec.flag}/--no-{spec.flag}"
                kwargs = {"default": None}
            elif spec.kind is bool:
                kwargs = {"is_flag": True, "default": spec.default}
            else:
                kwargs = {"type": click_type(spec), "default": spec.default}
            shown = spec.show_default if spec.kind is not bool or spec.default is None else False
            function = option(*flags, spec.name, topic=spec.group, aliases=spec.aliases, help=spec.help,
                              show_default=shown, **kwargs)(function)
        return function
    return decorate


def output_options(function):
    """--json, and the old per-command --quiet (hidden: -q/--quiet is on the group now)."""
    function = click.option("--quiet", "quiet", is_flag=True, hidden=True,
                            help="Old spelling of `stars-deploy -q`.")(function)
    return option("--json", "as_json", is_flag=True, topic="Output", show_default=False,
                  help="Print one JSON object on stdout (progress and logs stay on stderr).")(function)


def device_option(help_text: str = "auto, cpu, cuda or cuda:N."):
    return option("--device", default=DEFAULT_DEVICE, topic="Speed", help=help_text)


def runs_dir_option(function):
    return option("--runs-dir", type=click.Path(path_type=Path), default=Path("runs"), topic="Run directory",
                  help="Where to find the latest run when RUN_DIR is not given.")(function)


def quiet_if(quiet: bool) -> None:
    """The old per-command --quiet still silences progress."""
    if quiet:
        set_quiet(True)
