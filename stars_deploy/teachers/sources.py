"""Where a teacher that is not a named architecture comes from.

- ``FACTORY`` (``--teacher package.module:function``): the function is imported and called
  with no arguments and must return the classifier (an ``nn.Module``); ``--weights``, when
  given, is then loaded into it with ``weights_only=True``. Importing runs the user's own
  code, which is what naming it asks for; nothing is unpickled.
- ``PROGRAM`` (``--teacher FILE.pt2``): a ``torch.export`` program (adapters.py).
- ``MODULE`` (Python API): a module passed in, held here for the process under a key the run
  manifest records; another process (a resume, an export of the teacher) must pass it again.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from torch import nn

from stars_deploy.errors import ConfigError

FACTORY, PROGRAM, MODULE = "factory", "program", "module"
SOURCES = (FACTORY, PROGRAM, MODULE)
_MODULES: dict[str, nn.Module] = {}


def is_factory(text: str) -> bool:
    """``package.module:function``: dotted names on both sides of one colon."""
    module, _, function = text.partition(":")
    return bool(module and function) and all(part.isidentifier() for part in (*module.split("."), function))


def is_program(text: str) -> bool:
    return Path(text).suffix == ".pt2"


def call_factory(reference: str) -> nn.Module:
    module_name, _, function_name = reference.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"--teacher {reference}: cannot import {module_name} ({exc}); is its package installed "
                          "or on PYTHONPATH?") from None
    function = getattr(module, function_name, None)
    if not callable(function):
        raise ConfigError(f"--teacher {reference}: {module_name} has no function {function_name}")
    model = function()
    if not isinstance(model, nn.Module):
        raise ConfigError(f"--teacher {reference}: it returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def hold_module(module: nn.Module) -> str:
    """Keep ``module`` for this process; the key names it in the run's manifest."""
    key = f"{type(module).__module__}.{type(module).__qualname__}#{id(module):x}"
    _MODULES[key] = module
    return key


def held_module(key: str) -> nn.Module:
    if key not in _MODULES:
        raise ConfigError(f"the run's teacher was a module passed from Python ({key.split('#')[0]}); pass it "
                          "again (teacher=module) in this process")
    return _MODULES[key]
