"""CI gates on a target's simulation summary: what they measure, where their limits come
from, how they are judged and reported (table rows, JSON, JUnit XML).

Limits come, lowest precedence first, from a config file's table, its per-target sub-table,
then command-line options:

    # stars-deploy.toml                  # or pyproject.toml
    [check]                              [tool.stars-deploy.check]
    min-accuracy = 0.9                   min-accuracy = 0.9
    max-accuracy-drop = 0.01
    [check.loihi]                        [tool.stars-deploy.check.loihi]
    max-synops-per-sample = 2e5          max-synops-per-sample = 2e5

Keys may use dashes or underscores. The table may also name ``target``, ``data`` and
``samples`` (what to simulate; ``targets``, a list, is for `stars-deploy pipeline`). A limit
that is not set is not checked.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass
from pathlib import Path
from xml.etree import ElementTree

from stars_deploy.errors import ConfigError
from stars_deploy.fileio import write_bytes

from .registry import target_names


GATE_FAILED = 1  # the exit code of `check` and `pipeline` when a gate fails (2: bad input)


@dataclass(frozen=True)
class Gate:
    name: str  # the option without dashes: min_accuracy
    metric: str  # what it reads from the measured values
    minimum: bool  # True: measured >= limit passes; False: measured <= limit passes
    kind: type  # float or int
    description: str
    low: float | None = None  # the range a limit must lie in (a fraction: 0..1)
    high: float | None = None

    @property
    def fraction(self) -> bool:
        """A share (accuracy, agreement...): shown as a percentage."""
        return self.kind is float and self.high == 1.0


GATES = {gate.name: gate for gate in (
    Gate("min_accuracy", "accuracy", True, float, "accuracy on the evaluation data (0-1)", 0.0, 1.0),
    Gate("max_accuracy_drop", "accuracy_drop", False, float,
         "float student accuracy minus target accuracy, on the same images (-1..1)", -1.0, 1.0),
    Gate("min_agreement", "agreement", True, float, "fraction of predictions equal to the float student's (0-1)",
         0.0, 1.0),
    Gate("max_spikes_per_sample", "spikes_per_sample", False, float, "spikes per sample, all layers", 0.0),
    Gate("max_synops_per_sample", "synops_per_sample", False, float, "synaptic operations per sample", 0.0),
    Gate("max_latency_steps", "latency_steps", False, int, "steps from input to decision, pipeline delay included",
         0),
    Gate("min_activity_similarity", "activity_similarity", True, float,
         "cosine similarity of per-layer mean firing rates, target against float student (0-1)", 0.0, 1.0),
)}
RUN_KEYS = {"target": str, "targets": list, "data": str, "samples": int}  # what to run, besides the limits
CONFIG_FILES = ("stars-deploy.toml", "pyproject.toml")


def _table(document: dict, path: Path) -> dict | None:
    if path.name == "pyproject.toml":
        return document.get("tool", {}).get("stars-deploy", {}).get("check")
    return document.get("check")


def _key_name(path: Path) -> str:
    return "[tool.stars-deploy.check]" if path.name == "pyproject.toml" else "[check]"


def _validate(values: dict, where: str) -> dict:
    """Normalised keys with checked types; errors name the key and where it was found."""
    clean = {}
    for key, value in values.items():
        name = key.replace("-", "_")
        if name in GATES:
            expected = GATES[name].kind
            numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not numeric or (expected is int and not float(value).is_integer()) or not math.isfinite(value):
                raise ConfigError(f"{where}: {key} must be a{'n integer' if expected is int else ' number'}, "
                                  f"got {value!r}")
            gate = GATES[name]
            if (gate.low is not None and value < gate.low) or (gate.high is not None and value > gate.high):
                bounds = f"{gate.low if gate.low is not None else '-inf'}..{gate.high if gate.high is not None else 'inf'}"
                raise ConfigError(f"{where}: {key} = {value!r} is outside {bounds}")
            clean[name] = expected(value)
        elif name in RUN_KEYS:
            if not isinstance(value, RUN_KEYS[name]) or isinstance(value, bool):
                raise ConfigError(f"{where}: {key} must be a {RUN_KEYS[name].__name__}, got {value!r}")
            clean[name] = value
        else:
            known = ", ".join(k.replace("_", "-") for k in [*GATES, *RUN_KEYS])
            raise ConfigError(f"{where}: unknown key {key!r}; known keys: {known}")
    return clean


def load_check_config(path: Path | None = None, target: str | None = None,
                      directory: Path = Path(".")) -> tuple[dict, Path | None]:
    """(settings, the file they came from) from ``path``, or else the first of
    stars-deploy.toml / pyproject.toml in ``directory`` that has a check table. The
    per-target sub-table for ``target`` overrides the shared keys."""
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"check config {path} does not exist")
        candidates = [path]
    else:
        candidates = [Path(directory) / name for name in CONFIG_FILES if (Path(directory) / name).is_file()]
    for candidate in candidates:
        try:
            document = tomllib.loads(candidate.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{candidate} is not valid TOML: {exc}") from None
        table = _table(document, candidate)
        if table is None:
            if path is not None:
                raise ConfigError(f"{candidate} has no {_key_name(candidate)} table")
            continue
        if not isinstance(table, dict):
            raise ConfigError(f"{candidate}: {_key_name(candidate)} must be a table")
        where = f"{candidate} {_key_name(candidate)}"
        shared = {k: v for k, v in table.items() if not isinstance(v, dict)}
        settings = _validate(shared, where)
        names = target_names()
        for sub, values in table.items():
            if isinstance(values, dict) and sub not in names:
                raise ConfigError(f"{where}: unknown sub-table [{sub}]; per-target tables are {', '.join(names)}")
        if target is not None and isinstance(table.get(target), dict):
            settings.update(_validate(table[target], f"{where[:-1]}.{target}]"))
        return settings, candidate
    return {}, None


def measured_values(summary: dict) -> dict[str, float | None]:
    """The gated metrics from a simulation summary compared with the float student."""
    drop = None
    if summary.get("accuracy") is not None and summary.get("reference_accuracy") is not None:
        drop = summary["reference_accuracy"] - summary["accuracy"]
    return {"accuracy": summary.get("accuracy"), "accuracy_drop": drop, "agreement": summary.get("agreement"),
            "spikes_per_sample": summary.get("spikes_per_sample"),
            "synops_per_sample": summary.get("synops_per_sample"),
            "latency_steps": summary.get("latency_steps"),
            "activity_similarity": summary.get("activity_similarity")}


def evaluate(limits: dict, values: dict) -> list[dict]:
    """One row per gate that has a limit: measured value, limit, and whether it passed. A
    metric the summary lacks (e.g. agreement without the float student) fails, saying why."""
    rows = []
    for name, limit in limits.items():
        gate = GATES[name]
        measured = values.get(gate.metric)
        if measured is None:
            passed, note = False, f"{gate.metric} was not measured"
        else:
            passed = measured >= limit if gate.minimum else measured <= limit
            note = ""
        rows.append({"gate": name.replace("_", "-"), "metric": gate.metric, "measured": measured,
                     "limit": limit, "comparison": ">=" if gate.minimum else "<=", "passed": passed,
                     "note": note, "description": gate.description})
    return rows


def write_junit_xml(path: Path, rows: list[dict], suite: str) -> None:
    """A JUnit XML report (one test case per gate), written atomically."""
    failures = sum(not row["passed"] for row in rows)
    root = ElementTree.Element("testsuite", name=suite, tests=str(len(rows)), failures=str(failures), errors="0")
    for row in rows:
        case = ElementTree.SubElement(root, "testcase", classname=suite, name=row["gate"])
        if not row["passed"]:
            message = row["note"] or f"{row['metric']} = {row['measured']} is not {row['comparison']} {row['limit']}"
            ElementTree.SubElement(case, "failure", message=message).text = row["description"]
        ElementTree.SubElement(case, "system-out").text = f"{row['metric']} = {row['measured']} (limit {row['limit']})"
    write_bytes(Path(path), ElementTree.tostring(root, encoding="utf-8", xml_declaration=True))
