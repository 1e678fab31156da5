"""The examples run as users run them: the notebook-style API walk-through with a teacher the
package does not know, and end_to_end.sh writing its report even when a gate fails."""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_notebook_example_runs_a_teacher_defined_in_it(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "examples" / "notebook.py")], cwd=tmp_path, capture_output=True,
                          text=True, env={**os.environ, "BUDGET_S": "10", "WORK": str(tmp_path)}, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Loihi emulator" in done.stdout and re.search(r"^gates (passed|FAILED) \[\('min-accuracy'", done.stdout, re.M)
    assert "| loihi |" in done.stdout  # the Markdown summary
    assert (tmp_path / "runs" / "tiny" / "report.html").is_file()


def test_end_to_end_writes_the_report_when_a_gate_fails_and_exits_with_checks_code(tmp_path, digits_teacher):
    stars = Path(sys.executable).parent / "stars-deploy"
    done = subprocess.run(["bash", str(ROOT / "examples" / "end_to_end.sh")], cwd=tmp_path, capture_output=True,
                          text=True, timeout=1800, env={**os.environ, "STARS": str(stars), "RUNS": str(tmp_path),
                                                        "BUDGET_S": "10", "MIN_ACCURACY": "1.0"})
    assert done.returncode == 1, done.stderr[-3000:]  # the gate's code, not an error's (2)
    assert "GATE FAILED" in done.stdout and "min-accuracy" in done.stdout
    run = tmp_path / "example-default"
    assert (run / "report.html").is_file() and (run / "report.md").is_file()
    assert f"open {run}/report.html" in done.stdout
