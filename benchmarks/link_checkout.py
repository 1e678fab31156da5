"""Lay the checkout out the way pyproject.toml installs it, as symbolic links, so that a
folder on PYTHONPATH imports it like an install, without pip, setuptools or a network.

    python3 benchmarks/link_checkout.py .pkg     # then PYTHONPATH=$PWD/.pkg

pyproject maps packages to other folders (``stars_deploy.targets`` is the checkout's
``targets/``, ``stars_deploy.exporters`` its ``exporters/``); with only the checkout on
PYTHONPATH, ``import stars_deploy.targets`` fails, and with it the CLI (``python -m
stars_deploy``, which torchrun_compare.py runs) and every export and simulation. The links
point into the checkout, so its files are used as they are now. A package whose
subpackages live elsewhere becomes a real folder of links to its entries. Without a
package-dir mapping every listed package is one link to its own folder. Standard library
only (Python 3.11+ for tomllib); run from anywhere, the checkout is this file's parent's parent.
"""

from __future__ import annotations

import shutil
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def link_checkout(target: Path, root: Path = ROOT) -> list[str]:
    """Fill ``target`` (emptied first) with links for every package pyproject lists; returns
    the packages laid out."""
    with open(root / "pyproject.toml", "rb") as handle:
        setuptools = tomllib.load(handle).get("tool", {}).get("setuptools", {})
    packages = setuptools.get("packages")
    if not isinstance(packages, list):  # found by setuptools' find: nothing is mapped elsewhere
        return []
    mapping = setuptools.get("package-dir", {})
    if target.is_symlink() or target.is_file():
        target.unlink()
    elif target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    for package in sorted(packages, key=lambda name: name.count(".")):  # parents before their children
        source = root / mapping.get(package, package.replace(".", "/"))
        dest = target.joinpath(*package.split("."))
        children = {p[len(package) + 1:].split(".")[0] for p in packages if p.startswith(package + ".")}
        if not children:
            dest.symlink_to(source, target_is_directory=True)
            continue
        dest.mkdir(parents=True, exist_ok=True)
        for entry in sorted(source.iterdir()):
            if entry.name not in children and entry.name != "__pycache__":
                (dest / entry.name).symlink_to(entry, target_is_directory=entry.is_dir())
    return list(packages)


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    packages = link_checkout(Path(sys.argv[1]).absolute())
    print(f"linked {', '.join(packages) or 'nothing (no package list in pyproject.toml)'} into {sys.argv[1]}")


if __name__ == "__main__":
    main()
