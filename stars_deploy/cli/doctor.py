"""``stars-deploy doctor``: versions and a working check of every part (stars_deploy/diagnosis.py)."""

from __future__ import annotations

import click

from .common import TopicCommand, emit, output_options, quiet_if, table

BROKEN = 1  # a required part does not work here (as a failed gate: something to fix, not a usage error)


@click.command(cls=TopicCommand)
@output_options
@click.pass_context
def doctor(ctx, as_json, quiet):
    """Report the versions and whether each part works here: the required ones (torch, Norse,
    NIR, ONNX, the cache) and the optional ones (Lava, CUDA, chromium). Exit 0 when every
    required part works, 1 when one does not."""
    from stars_deploy import api

    quiet_if(quiet)
    result = api.doctor()
    if as_json:
        emit(result, True, [])
    else:
        table(("part", "status", "found", "to fix"),
              [(c["name"], "ok" if c["ok"] else ("BROKEN" if c["required"] else "missing (optional)"), c["detail"],
                "" if c["ok"] else c["fix"]) for c in result["checks"]])
        click.echo("every required part works" if result["healthy"] else
                   "a required part does not work: see 'to fix'")
    if not result["healthy"]:
        ctx.exit(BROKEN)
