"""gpu_check.sh's packing: one short summary.md and one results.tar.gz, and a check that the
device machine's $OUT folder hands back everything it holds.

    python3 benchmarks/gpu_summary.py RESULTS_DIR --out OUT   # OUT/summary.md + OUT/results.tar.gz
    python3 benchmarks/gpu_summary.py RESULTS_DIR             # print the summary only
    python3 benchmarks/gpu_summary.py --check-out OUT         # exit 1, loudly, if OUT would lose files

The device run returns at most 8 files from $OUT (16 MiB each, at most two folders deep,
plain files with plain names) and the last 12,000 characters of the output: so every result
goes into the archive, and the summary (cut to SUMMARY_LIMIT characters) is printed last.

What it reads in RESULTS_DIR (all optional: a missing or partial file gives a line saying so,
never an exception; gpu_check.sh writes them):
  run.env             KEY=VALUE lines: TOTAL_S, START_EPOCH, BUDGET_S, DEVICE, SETTINGS
  stages.tsv          name, limit s, elapsed s, exit code (or "skipped") per finished stage
  device.txt          torch, CUDA, GPU, driver
  speed_*.md/.err     distill_speed.py tables (rows printed as they finish)
  cuda_checks.md/.err cuda_checks.py's table
  torchrun.md/.err    torchrun_compare.py's table
  candidates.tsv      name, cifar10.py options per CIFAR-10 candidate
  cifar10-NAME.json/.err  cifar10.py --json per candidate
Standard library only (it runs on the device before anything else is known to work).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import sys
import tarfile
import time
from pathlib import Path

SUMMARY_LIMIT = 9000  # characters; the output's last 12,000 must hold it and the check's lines
OUT_FILES_MAX = 8
OUT_FILE_BYTES_MAX = 16 * 2**20
OUT_DEPTH_MAX = 2  # folders below OUT
ARCHIVE_BYTES_MAX = 15 * 2**20  # a margin under OUT_FILE_BYTES_MAX
MEMBER_BYTES_MAX = 2 * 2**20  # a larger result file goes into the archive as head + tail
SAFE_NAME = re.compile(r"^[A-Za-z0-9._-]+$")
ERR_TAIL_CHARS = 240
SYNC_LINE_CHARS = 240
ROW_CHARS = 280  # a checks row: the counts come first, so a cut row keeps them
SPEED_ROWS_MAX = 40
OWN_SECTIONS = ("speed_convnet", "speed_compiled", "cuda_checks", "torchrun")  # they show their own stderr
SPEED_STAGES = (("speed_convnet", "Speed: convnet student, ResNet-20 teacher (each speed change side by side)"),
                ("speed_compiled", "Speed: compiled synthesis objective, with the sync report"))


def read_text(path: Path) -> str | None:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return None


def read_env(path: Path) -> dict[str, str]:
    values = {}
    for line in (read_text(path) or "").splitlines():
        key, sep, value = line.partition("=")
        if sep:
            values[key.strip()] = value.strip()
    return values


def read_stages(path: Path) -> dict[str, dict]:
    """name -> {limit, elapsed, rc}; a malformed line is skipped."""
    stages = {}
    for line in (read_text(path) or "").splitlines():
        parts = line.split("\t")
        if len(parts) >= 4:
            stages[parts[0]] = {"limit": parts[1], "elapsed": parts[2], "rc": parts[3].strip()}
    return stages


def describe_rc(rc: str | None) -> str:
    if rc is None:
        return "no record (still running, or killed before it could write one)"
    return {"0": "ok", "124": "timeout", "137": "killed after its timeout", "skipped": "skipped: no time left"}.get(
        rc, f"exit {rc}")


def err_tail(path: Path, limit: int = ERR_TAIL_CHARS) -> str:
    """The last lines of an error file that say something (progress bars dropped), one line."""
    text = read_text(path)
    if not text:
        return ""
    lines = [line.strip() for line in re.split(r"[\r\n]+", text) if line.strip()]
    lines = [line for line in lines if not re.search(r"\d+%\|", line)] or lines  # tqdm bars
    tail = " / ".join(lines[-3:])
    return cell(tail[-limit:] if len(tail) > limit else tail)


def cell(text: str) -> str:
    """Text that is safe inside one markdown table cell."""
    return str(text).replace("|", "/").replace("\n", " ").strip()


def percent(value) -> str:
    return f"{100 * value:.1f} %" if isinstance(value, (int, float)) else "-"


def count(value) -> str:
    return f"{int(value):,}" if isinstance(value, (int, float)) else "-"


def load_json(path: Path) -> dict | None:
    text = read_text(path)
    if not text or not text.strip():
        return None
    try:
        value = json.loads(text.strip().splitlines()[-1])  # cifar10.py --json: one object, last line
    except (json.JSONDecodeError, IndexError):
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            return None
    return value if isinstance(value, dict) else None


def stage_table(stages: dict[str, dict], env: dict[str, str], results: Path) -> list[str]:
    total = env.get("TOTAL_S", "?")
    used = "?"
    if env.get("START_EPOCH", "").isdigit():
        used = str(int(time.time()) - int(env["START_EPOCH"]))
    lines = [f"Time budget: {total} s for the whole command (packing included), {used} s used when this was "
             "written; each stage has its own limit:", "",
             "| stage | limit s | took s | result |", "|---|---|---|---|"]
    cifar = {name: s for name, s in stages.items() if name.startswith("cifar10-")}
    for name, s in stages.items():
        if not name.startswith("cifar10-"):
            result = describe_rc(s["rc"])
            if name not in OWN_SECTIONS and s["rc"] not in ("0", "skipped"):  # setup: its cause here
                tail = err_tail(results / f"{name}.err")
                result += f"; stderr: {tail}" if tail else ""
            lines.append(f"| {name} | {s['limit']} | {s['elapsed']} | {result} |")
    started = [p.stem for p in sorted(results.glob("*.err"))]
    for name in started:  # begun but never recorded: still running, or the whole command was killed
        if name not in stages and not name.startswith("cifar10-"):
            lines.append(f"| {name} | ? | ? | {describe_rc(None)} |")
    if cifar:
        results_of = sorted({describe_rc(s["rc"]) for s in cifar.values()})
        longest = max((s["elapsed"] for s in cifar.values()), key=lambda v: int(v) if v.isdigit() else -1)
        lines.append(f"| cifar10 x{len(cifar)} (at once) | {next(iter(cifar.values()))['limit']} | {longest} (longest) "
                     f"| {', '.join(results_of)} |")
    return lines


def speed_section(results: Path, stem: str, title: str, stages: dict) -> list[str]:
    lines = [f"## {title}", ""]
    text = read_text(results / f"{stem}.md") or ""
    rows = [line for line in text.splitlines() if line.startswith("|")]
    syncs = [line for line in text.splitlines() if line.startswith("syncs of")]
    if len(rows) > SPEED_ROWS_MAX:
        rows = rows[:SPEED_ROWS_MAX] + [f"| ... {len(rows) - SPEED_ROWS_MAX} more rows in {stem}.md |"]
    lines += rows
    lines += ["", *[line if len(line) <= SYNC_LINE_CHARS else line[:SYNC_LINE_CHARS] + " ..." for line in syncs]]
    rc = stages.get(stem, {}).get("rc")
    if rc != "0":
        measured = max(0, len([r for r in rows if not r.startswith("|---")]) - 1)
        note = f"{describe_rc(rc)}; {measured} rows measured"
        tail = err_tail(results / f"{stem}.err")
        lines.append(f"({note}{'; stderr: ' + tail if tail and rc not in ('124', '137') else ''})")
    return lines


def table_section(results: Path, stem: str, title: str, stages: dict) -> list[str]:
    lines = [f"## {title}", ""]
    text = read_text(results / f"{stem}.md") or ""
    lines += [line if len(line) <= ROW_CHARS else line[:ROW_CHARS - 6] + " ... |" for line in text.splitlines()
              if line.startswith("|") or re.match(r"^\d+ checks on", line)]
    rc = stages.get(stem, {}).get("rc")
    if rc != "0":
        tail = err_tail(results / f"{stem}.err")
        lines.append(f"({describe_rc(rc)}{'; stderr: ' + tail if tail else ''})")
    return lines


def candidate_rows(results: Path, stages: dict) -> list[str]:
    names = []
    for line in (read_text(results / "candidates.tsv") or "").splitlines():
        if line.strip():
            names.append(line.split("\t")[0].strip())
    for path in sorted(results.glob("cifar10-*.json")) + sorted(results.glob("cifar10-*.err")):
        name = path.stem[len("cifar10-"):]
        if name not in names:
            names.append(name)
    lines = ["| run | student | teacher | agreement | lossless-200 student | synthetic images | KD images | rounds "
             "| wall s | result |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name in names:
        stage = stages.get(f"cifar10-{name}", {})
        data = load_json(results / f"cifar10-{name}.json")
        rc = stage.get("rc")
        if data is None:
            tail = err_tail(results / f"cifar10-{name}.err")
            result = "exit 0 but no JSON on stdout" if rc == "0" else describe_rc(rc)
            lines.append(f"| {name} | - | - | - | - | - | - | - | {stage.get('elapsed', '?')} | "
                         f"{result}{'; ' + tail if tail else ''} |")
            continue
        kd_images = data.get("kd_images")
        if kd_images is None and all(isinstance(data.get(k), int) for k in ("rounds", "kd_steps", "kd_batch_size")):
            kd_images = data["rounds"] * data["kd_steps"] * data["kd_batch_size"]
        also = data.get("also_eval") or {}
        wall = data.get("wall_time_s")
        lines.append(f"| {name} | {percent(data.get('student_accuracy'))} | {percent(data.get('teacher_accuracy'))} "
                     f"| {percent(data.get('agreement'))} | {percent(also.get('student_accuracy'))} "
                     f"| {count(data.get('synthetic_images'))} | {count(kd_images)} | {count(data.get('rounds'))} "
                     f"| {f'{wall:.0f}' if isinstance(wall, (int, float)) else stage.get('elapsed', '?')} "
                     f"| {describe_rc(rc) if rc is not None else 'ok'} |")
    return lines


def summary(results: Path) -> str:
    """The whole summary as markdown (not yet cut to SUMMARY_LIMIT)."""
    env, stages = read_env(results / "run.env"), read_stages(results / "stages.tsv")
    device = [line for line in (read_text(results / "device.txt") or "no device.txt").splitlines() if line.strip()]
    lines = [f"# gpu_check summary, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", "",
             *[f"    {line[:200]}" for line in device[:8]], ""]
    if env.get("SETTINGS"):
        lines += [f"Settings: {env['SETTINGS']}", ""]
    lines += stage_table(stages, env, results) + [""]
    # most wanted first: a summary cut at SUMMARY_LIMIT loses the end of the speed tables
    budget = env.get("BUDGET_S", "?")
    lines += [f"## CIFAR-10 candidates, all at once on the one GPU, --budget-s {budget} each "
              "(accuracies are lower bounds for a run alone; options in candidates.tsv)", ""]
    lines += candidate_rows(results, stages) + [""]
    lines += table_section(results, "cuda_checks", "CUDA correctness checks (benchmarks/cuda_checks.py)", stages)
    lines += [""] + table_section(results, "torchrun", "torchrun, 1 process, against the plain command "
                                  "(runs beside the CIFAR-10 runs: compare weights, not speed)", stages) + [""]
    for stem, title in SPEED_STAGES:
        lines += speed_section(results, stem, title, stages) + [""]
    lines += ["Everything (tables, JSON, stderr) is in results.tar.gz."]
    return "\n".join(lines) + "\n"


def cut(text: str, limit: int | None = None) -> str:
    limit = limit or SUMMARY_LIMIT
    if len(text) <= limit:
        return text
    note = f"\n... summary cut at {limit:,} of {len(text):,} characters: summary_full.md in results.tar.gz\n"
    return text[:limit - len(note)].rsplit("\n", 1)[0] + note


def _trimmed(path: Path, limit: int) -> bytes:
    data = path.read_bytes()
    if len(data) <= limit:
        return data
    head, tail = limit // 8, limit - limit // 8
    return data[:head] + f"\n[... {len(data) - head - tail:,} bytes cut by gpu_summary.py ...]\n".encode() + data[-tail:]


def write_archive(results: Path, target: Path, member_limit: int) -> None:
    with tarfile.open(target, "w:gz") as archive:
        for path in sorted(results.rglob("*")):
            if path.is_file() and not path.is_symlink():
                data = _trimmed(path, member_limit)
                info = tarfile.TarInfo(f"results/{path.relative_to(results)}")
                info.size, info.mtime, info.mode = len(data), int(path.stat().st_mtime), 0o644
                archive.addfile(info, io.BytesIO(data))


def pack(results: Path, out: Path) -> None:
    """OUT/summary.md and OUT/results.tar.gz, each written under a temporary name and renamed,
    so a command killed while packing still leaves the previous complete pair."""
    out.mkdir(parents=True, exist_ok=True)
    full = summary(results)
    (results / "summary_full.md").write_text(full)
    archive = out / ".results.tar.gz.part"
    member_limit = MEMBER_BYTES_MAX
    write_archive(results, archive, member_limit)
    while archive.stat().st_size > ARCHIVE_BYTES_MAX and member_limit > 4096:
        member_limit //= 4  # too big for the way back: cut every large file harder
        write_archive(results, archive, member_limit)
    os.replace(archive, out / "results.tar.gz")
    part = out / ".summary.md.part"
    part.write_text(cut(full))
    os.replace(part, out / "summary.md")


def check_out(out: Path, summary_limit: int = 10_000) -> list[str]:
    """What the device run would lose or garble from ``out``; empty when everything comes back."""
    problems, files = [], []
    if not out.is_dir():
        return [f"{out} is not a folder"]
    for root, folders, names in os.walk(out, followlinks=False):
        here = Path(root)
        depth = len(here.relative_to(out).parts)
        for name in folders + names:
            path = here / name
            shown = ascii(str(path.relative_to(out)))
            if not SAFE_NAME.match(name):
                problems.append(f"{shown}: a name with characters other than letters, digits, '.', '_', '-'")
            if path.is_symlink():
                problems.append(f"{shown}: a link, which does not come back")
            elif path.is_dir():
                if depth + 1 > OUT_DEPTH_MAX:
                    problems.append(f"{shown}: a folder more than {OUT_DEPTH_MAX} deep")
            elif not path.is_file():
                problems.append(f"{shown}: not a plain file")
            else:
                files.append(path)
                if path.stat().st_size > OUT_FILE_BYTES_MAX:
                    problems.append(f"{shown}: {path.stat().st_size:,} bytes, over {OUT_FILE_BYTES_MAX:,}")
    if len(files) > OUT_FILES_MAX:
        problems.append(f"{len(files)} files, more than {OUT_FILES_MAX} come back: "
                        + ", ".join(str(p.relative_to(out)) for p in files))
    summary_md = out / "summary.md"
    if not summary_md.is_file():
        problems.append("no summary.md")
    elif len(summary_md.read_text(errors="replace")) > summary_limit:
        problems.append(f"summary.md has {len(summary_md.read_text(errors='replace')):,} characters, over "
                        f"{summary_limit:,} (it must arrive within the output's last 12,000)")
    archive = out / "results.tar.gz"
    if not archive.is_file():
        problems.append("no results.tar.gz")
    else:
        try:
            with tarfile.open(archive, "r:gz") as opened:
                opened.getmembers()
        except (tarfile.TarError, OSError, EOFError) as exc:
            problems.append(f"results.tar.gz does not read back: {exc}")
    return problems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="?", type=Path, help="the folder gpu_check.sh writes its results into")
    parser.add_argument("--out", type=Path, default=None, help="write summary.md and results.tar.gz here")
    parser.add_argument("--check-out", type=Path, default=None, metavar="DIR",
                        help="check DIR against what the device run hands back; exit 1 if it would lose anything")
    args = parser.parse_args()
    if args.check_out is not None:
        problems = check_out(args.check_out)
        files = [p for p in sorted(args.check_out.rglob("*")) if p.is_file()]
        if problems:
            print(f"OUT CHECK FAILED: {args.check_out} would not come back whole:", *problems, sep="\n  ")
            sys.exit(1)
        print(f"out check: ok, {len(files)} files: "
              + ", ".join(f"{p.relative_to(args.check_out)} {p.stat().st_size / 2**20:.2f} MiB" for p in files)
              + f"; summary.md {len((args.check_out / 'summary.md').read_text()):,} characters")
        return
    if args.results is None:
        parser.error("give RESULTS_DIR or --check-out DIR")
    if args.out is not None:
        pack(args.results, args.out)
    else:
        print(cut(summary(args.results)), end="")


if __name__ == "__main__":
    main()
