"""Helpers for the runners whose reader builds a torch module (norse, snntorch, sinabs, rockpool)."""

from __future__ import annotations

import numpy as np
import torch


class SpikeRecorder:
    """Forward hooks on the modules of the spiking NIR nodes: the spikes of every call.

    ``modules`` maps a NIR node name to its torch module; ``pick`` takes a module's output
    (a tensor, or a tuple whose first item is the spikes) and returns the spikes."""

    def __init__(self, modules: dict, pick=None):
        self.calls = {name: [] for name in modules}
        self.pick = pick or (lambda out: out[0] if isinstance(out, tuple) else out)
        self.handles = [module.register_forward_hook(self._hook(name)) for name, module in modules.items()]

    def _hook(self, name):
        def hook(module, inputs, output):
            self.calls[name].append(self.pick(output).detach().float().cpu().numpy())
        return hook

    def take(self) -> dict:
        """The spikes recorded since the last take, as {name: (calls, ...)} arrays."""
        out = {name: np.stack(calls) for name, calls in self.calls.items() if calls}
        for calls in self.calls.values():
            calls.clear()
        return out


def modules_by_nir_name(model: torch.nn.Module, names) -> dict:
    """The submodules of a nirtorch-built model for the NIR node ``names`` (nirtorch turns '.'
    into '_' in module names)."""
    found = {}
    submodules = dict(model.named_modules())
    for name in names:
        for candidate in (name, name.replace(".", "_")):
            if candidate in submodules:
                found[name] = submodules[candidate]
                break
    return found
