"""Run a NIR file in Rockpool's own importer: ``rockpool.nn.modules.torch.nir.from_nir(graph)``.

Rockpool 3.1.0's from_nir (torch backend, through nirtorch.load) maps Input, Output, LI, LIF,
CubaLIF, Linear, Affine and a recurrent CubaLIF subgraph only: Conv2d, Flatten and the pooling
nodes have no mapping (NotImplementedError "Cannot convert ..."), and its LIF branch reads
``node.tau_mem``, which nir.LIF does not have (only CubaLIF does). It derives its own dt from
the graph (min(tau_mem / (1 + r))); no setting exists. Rockpool modules take (B, T, N) and
return (output, state, record); the graph executor steps one call per step.

    .venv-interop/rockpool/bin/python tools/interop/run_rockpool.py --nir s.nir --inputs in.npz --out out.npz
"""

from __future__ import annotations

import sys
from importlib.metadata import version

import numpy as np

import _common


def main(argv=None) -> int:
    p = _common.parser("rockpool", __doc__.splitlines()[0])
    args = _common.parse(p, argv)
    import nir
    import torch
    from rockpool.nn.modules.torch.nir import from_nir
    if args.check:
        return 0
    torch.set_num_threads(1)
    inputs, steps, dt = _common.load_inputs(args.inputs)
    graph = nir.read(args.nir)
    model = from_nir(graph)  # fails on conv graphs (see above); the rest is for graphs it can build
    runs = []
    with torch.no_grad():
        for part in _common.chunks(len(inputs), args.batch):
            x = torch.from_numpy(inputs[part]).reshape(len(inputs[part]), 1, -1)
            state, outs = None, []
            for _ in range(steps):
                out, state = model(x, state) if state is not None else model(x)
                out = out[0] if isinstance(out, tuple) else out
                outs.append(out.reshape(len(x), -1).float().numpy())
            runs.append((np.stack(outs), {}))
    logits, spikes = _common.concat_runs(runs)
    _common.save(args.out, logits, spikes, {"reader": "rockpool", "version": version("rockpool"),
                                            "settings": {}, "batch": args.batch})
    return 0


if __name__ == "__main__":
    sys.exit(main())
