"""Make lava-nc 0.10.0 importable on Python 3.11 (docs/ENVIRONMENT.md): idempotent.

lava/magma/compiler/var_model.py declares ``x: ByteEncoder = ByteEncoder()`` dataclass
defaults, which Python 3.11 rejects ("mutable default ... use default_factory") as soon as a
Lava process is compiled. This rewrites each to ``field(default_factory=ByteEncoder)`` and
imports ``field``; running it again changes nothing. Usage: python tools/patch_lava.py
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

MUTABLE_DEFAULT = re.compile(r"^(\s+\w+: ByteEncoder) = ByteEncoder\(\)$", re.MULTILINE)
IMPORT_LINE = "from dataclasses import dataclass, InitVar"
PATCHED_IMPORT = "from dataclasses import dataclass, InitVar, field"


def var_model_path() -> Path:
    spec = importlib.util.find_spec("lava")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("lava-nc is not installed in this environment: nothing to patch")
    return Path(list(spec.submodule_search_locations)[0]) / "magma" / "compiler" / "var_model.py"


def patch(text: str) -> str:
    text = MUTABLE_DEFAULT.sub(r"\1 = field(default_factory=ByteEncoder)", text)
    if PATCHED_IMPORT not in text:
        text = text.replace(IMPORT_LINE, PATCHED_IMPORT, 1)
    return text


def main() -> int:
    path = var_model_path()
    text = path.read_text()
    patched = patch(text)
    if patched != text:
        path.write_text(patched)
        print(f"patched {path}")
    else:
        print(f"{path} already patched")
    return 0


if __name__ == "__main__":
    sys.exit(main())
