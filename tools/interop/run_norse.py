"""Run a NIR file in Norse's own importer: ``norse.torch.from_nir(graph, dt=dt)``.

Reader-side settings: ``dt`` (Norse's from_nir takes it; default here the inputs file's dt,
i.e. the graph's metadata dt_s; Norse's own default is 1e-3 s). Norse steps the graph one
call per time step, ``out, state = model(x_t, state)``, state reset (None) per batch.
Spikes: forward hooks on the LIF modules (their output is (z, state)).

    .venv-interop/norse/bin/python tools/interop/run_norse.py --nir s.nir --inputs in.npz --out out.npz
"""

from __future__ import annotations

import sys
from importlib.metadata import version

import _common
import numpy as np


def main(argv=None) -> int:
    p = _common.parser("norse", __doc__.splitlines()[0])
    p.add_argument("--dt", type=float, default=None, help="dt passed to from_nir (default: the inputs' dt)")
    args = _common.parse(p, argv)
    import nir
    import norse.torch
    import torch
    from _torch import SpikeRecorder, modules_by_nir_name
    if args.check:
        return 0
    torch.set_num_threads(1)
    inputs, steps, dt = _common.load_inputs(args.inputs)
    dt = dt if args.dt is None else args.dt
    graph = nir.read(args.nir)
    spiking = [n for n, node in graph.nodes.items() if isinstance(node, (nir.LIF, nir.CubaLIF, nir.IF))]
    model = norse.torch.from_nir(graph, dt=dt)
    recorder = SpikeRecorder(modules_by_nir_name(model, spiking))
    runs = []
    with torch.no_grad():
        for part in _common.chunks(len(inputs), args.batch):
            x, state, outs = torch.from_numpy(inputs[part]), None, []
            for _ in range(steps):
                out, state = model(x, state)
                outs.append(out.reshape(len(x), -1).numpy())
            runs.append((np.stack(outs), recorder.take()))
    logits, spikes = _common.concat_runs(runs)
    _common.save(args.out, logits, spikes, {"reader": "norse", "version": version("norse"),
                                            "settings": {"dt": dt}, "batch": args.batch})
    return 0


if __name__ == "__main__":
    sys.exit(main())
