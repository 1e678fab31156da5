"""Run a NIR file in snnTorch's own importer: ``snntorch.import_from_nir(graph)``.

Reader-side setting: ``dt``. snnTorch 1.0.0 hard-codes dt = 1e-4 s inside import_from_nir
(beta = 1 - 1e-4 / tau, threshold / (r * 1e-4 / tau)) and reads no metadata; there is no
argument for it. ``--dt SECONDS`` (default: the inputs file's dt, the graph's metadata dt_s)
runs it at that dt by scaling every LIF/CubaLIF time constant by 1e-4 / dt before the import,
which gives import_from_nir's formulas exactly the ratios dt / tau of the file at ``dt``.
``--dt 1e-4`` runs it as released (no scaling). The neurons are stateful modules
(init_hidden=True): one call per time step, their membranes zeroed before every batch.
Spikes: forward hooks on the snn.Leaky / snn.Synaptic modules.

    .venv-interop/snntorch/bin/python tools/interop/run_snntorch.py --nir s.nir --inputs in.npz --out out.npz
"""

from __future__ import annotations

import contextlib
import io
import sys
from importlib.metadata import version

import numpy as np

import _common

SNNTORCH_DT = 1e-4  # snntorch/import_nir.py, `dt = 1e-4` in every neuron branch


def rescale_time(graph, factor: float) -> None:
    """Multiply every time constant of the graph's LIF and CubaLIF nodes by ``factor``."""
    import nir
    for node in graph.nodes.values():
        if isinstance(node, nir.LIF):
            node.tau = np.asarray(node.tau, dtype=np.float64) * factor
        elif isinstance(node, nir.CubaLIF):
            node.tau_mem = np.asarray(node.tau_mem, dtype=np.float64) * factor
            node.tau_syn = np.asarray(node.tau_syn, dtype=np.float64) * factor


def main(argv=None) -> int:
    p = _common.parser("snntorch", __doc__.splitlines()[0])
    p.add_argument("--dt", type=float, default=None,
                   help="run at this dt (default: the inputs' dt); 1e-4 = snnTorch as released")
    args = _common.parse(p, argv)
    import nir
    import snntorch
    import torch
    from snntorch.import_nir import import_from_nir
    from _torch import SpikeRecorder, modules_by_nir_name
    if args.check:
        return 0
    torch.set_num_threads(1)
    inputs, steps, dt = _common.load_inputs(args.inputs)
    dt = dt if args.dt is None else args.dt
    graph = nir.read(args.nir)
    if dt != SNNTORCH_DT:
        rescale_time(graph, SNNTORCH_DT / dt)
    spiking = [n for n, node in graph.nodes.items() if isinstance(node, (nir.LIF, nir.CubaLIF, nir.IF))]
    with contextlib.redirect_stdout(io.StringIO()):  # it prints every scaled array
        model = import_from_nir(graph)
    neurons = modules_by_nir_name(model, spiking)
    recorder = SpikeRecorder(neurons)
    runs = []
    with torch.no_grad():
        for part in _common.chunks(len(inputs), args.batch):
            for module in neurons.values():
                module.reset_mem()
            x, outs = torch.from_numpy(inputs[part]), []
            for _ in range(steps):
                out = model(x)
                out = out[0] if isinstance(out, tuple) else out
                outs.append(out.reshape(len(x), -1).float().numpy())
            runs.append((np.stack(outs), recorder.take()))
    logits, spikes = _common.concat_runs(runs)
    _common.save(args.out, logits, spikes, {"reader": "snntorch", "version": version("snntorch"),
                                            "settings": {"dt": dt}, "batch": args.batch,
                                            "dtype": str(out.dtype)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
