"""Print docs/deploy.md's NIR-reader compatibility table (Markdown) from tests/test_interop.py's
results (build/interop/results.json by default; STARS_INTEROP_RESULTS or a path argument).

    python tools/interop/table.py [results.json]
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

DEFAULT = Path(__file__).resolve().parents[2] / "build" / "interop" / "results.json"


def _number(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def table(data: dict) -> str:
    lines = ["| reader | version (nir) | result | reader-side setting | max logit diff | agreement "
             "| spike mismatches | install s | reason |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in data["rows"]:
        spikes = ("not exposed" if row.get("spike_mismatches") is None and row.get("status") in ("exact", "not exact")
                  else "-" if row.get("spike_mismatches") is None
                  else f"{row['spike_mismatches']:,} of {row['spikes_compared']:,}")
        reason = row.get("reason", "")
        if row.get("status") in ("fails to import", "wrong output"):
            reason = f"`{row.get('error', '')[:160]}`: {reason}"
        agreement = None if row.get("agreement") is None else 100 * row["agreement"]
        lines.append("| " + " | ".join([
            row["id"], f"{row.get('version') or '?'} ({row.get('nir') or '?'})", row["status"],
            row.get("setting") or "-", _number(row.get("max_logit_diff"), ".3g"), _number(agreement, ".1f") + (
                " %" if agreement is not None else ""), spikes, _number(row.get("install_s"), ".0f"),
            reason.replace("|", "\\|") or "-"]) + " |")
    lines.append("")
    lines.append(f"Reference: {data.get('reference')}; {data.get('student')}; {data.get('inputs')}; "
                 f"exact = every spike equal and logits within {data.get('logit_atol')}.")
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    path = Path(argv[0] if argv else os.environ.get("STARS_INTEROP_RESULTS", DEFAULT))
    if not path.is_file():
        print(f"no results at {path}: run `python -m pytest tests/test_interop.py` first", file=sys.stderr)
        return 2
    print(table(json.loads(path.read_text())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
