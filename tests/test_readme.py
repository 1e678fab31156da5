"""The README and docs/ stay true to the repository: short, set-up commands first, every
relative link resolving inside the repository, every `stars-deploy <command>` a real command.

Plain text only: nothing here imports the CLI (or torch)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MAX_LINES = 200
FENCE = re.compile(r"^\s*```")
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
INLINE_CODE = re.compile(r"`[^`\n]*`")
COMMAND = re.compile(r"stars-deploy((?:\s+-[\w-]+)*)\s+([a-z][a-z0-9_-]*)(?:\s+([a-z][a-z0-9_-]*))?")


def markdown_files() -> list[Path]:
    return [README, *sorted((ROOT / "docs").glob("*.md"))]


def split_code(text: str) -> tuple[str, list[str]]:
    """(the prose with code blocks and inline code removed, every code block and span)."""
    prose, code, block, inside = [], [], [], False
    for line in text.splitlines():
        if FENCE.match(line):
            if inside:
                code.append("\n".join(block))
                block = []
            inside = not inside
        elif inside:
            block.append(line)
        else:
            code.extend(span.strip("`") for span in INLINE_CODE.findall(line))
            prose.append(INLINE_CODE.sub("", line))
    return "\n".join(prose), code


def fenced_blocks(text: str) -> list[list[str]]:
    blocks, block, inside = [], [], False
    for line in text.splitlines():
        if FENCE.match(line):
            if inside:
                blocks.append(block)
                block = []
            inside = not inside
        elif inside:
            block.append(line)
    return blocks


def cli_commands() -> tuple[set[str], set[str]]:
    """(the top-level commands, the `teacher` group's commands), read from the CLI's source."""
    entry = (ROOT / "stars_deploy" / "cli" / "__init__.py").read_text()
    registered = re.search(r"for _command in \(([^)]*)\)", entry)
    assert registered, "stars_deploy/cli/__init__.py no longer registers commands with `for _command in (...)`"
    commands = {name.strip().replace("_", "-") for name in registered.group(1).split(",") if name.strip()}
    teacher = (ROOT / "stars_deploy" / "cli" / "teacher.py").read_text()
    subcommands = set(re.findall(r"@teacher\.command\(\s*\"([a-z-]+)\"", teacher))
    assert "teacher" in commands and subcommands, "could not read the teacher group's commands"
    return commands, subcommands


def test_readme_is_short():
    lines = README.read_text().splitlines()
    assert len(lines) < MAX_LINES, (f"README.md has {len(lines)} lines; keep it under {MAX_LINES} and move "
                                    "long material into docs/")


def test_readme_starts_with_the_set_up_commands():
    text = README.read_text()
    blocks = fenced_blocks(text)
    assert blocks, "README.md has no fenced code block"
    first = "\n".join(blocks[0])
    for command in ("make demo", "make test"):
        assert command in first, f"README.md's first code block must hold `{command}` (CI and users rely on it)"
    before = text.split("```", 1)[0].splitlines()
    prose = [line for line in before if line.strip() and not line.startswith("# ")]
    assert not prose, f"README.md: the set-up commands must come right after the title, not after {prose[0]!r}"


def test_relative_links_resolve_inside_the_repository():
    broken = []
    for path in markdown_files():
        prose, _ = split_code(path.read_text())
        for target in LINK.findall(prose):
            if target.startswith(("http://", "https://", "mailto:", "#")):
                continue
            relative = target.split("#", 1)[0]
            resolved = (path.parent / relative).resolve()
            where = f"{path.relative_to(ROOT)}: ({target})"
            if not resolved.is_relative_to(ROOT):
                broken.append(f"{where} leaves the repository")
            elif not resolved.exists():
                broken.append(f"{where} does not exist")
    assert not broken, "links that do not resolve:\n" + "\n".join(broken)


def test_readme_names_only_real_commands():
    commands, teacher_commands = cli_commands()
    _, code = split_code(README.read_text())
    unknown = []
    for snippet in code:
        for match in COMMAND.finditer(snippet):
            command, subcommand = match.group(2), match.group(3)
            if command not in commands:
                unknown.append(f"stars-deploy {command} (commands: {', '.join(sorted(commands))})")
            elif command == "teacher" and subcommand is not None and subcommand not in teacher_commands:
                unknown.append(f"stars-deploy teacher {subcommand} (teacher commands: "
                               f"{', '.join(sorted(teacher_commands))})")
    assert not unknown, "README.md names commands that do not exist:\n" + "\n".join(unknown)
