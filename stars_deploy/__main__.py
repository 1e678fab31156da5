"""``python -m stars_deploy`` (also what torchrun launches)."""

from .cli import main

main()
