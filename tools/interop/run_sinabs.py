"""Run a NIR file in Sinabs' own importer: ``sinabs.from_nir(graph, batch_size, num_timesteps)``.

Sinabs (AGPL-3.0: an optional test-time reader only, in its own venv) runs a whole sequence
per call: its *Squeeze layers take (B*T, ...) batch-major, so every sample's constant input
is repeated T times and the (B*T, K) output is read back as (T, B, K). It reads tau as a
number of steps (alpha = exp(-1/tau)), integrates v = alpha v + x (norm_input=False), spikes
when v >= threshold and resets by subtraction; dt does not enter (no setting exists).
Spikes: forward hooks on the LIFSqueeze / IAFSqueeze modules.

    .venv-interop/sinabs/bin/python tools/interop/run_sinabs.py --nir s.nir --inputs in.npz --out out.npz
"""

from __future__ import annotations

import sys
from importlib.metadata import version

import numpy as np

import _common


def main(argv=None) -> int:
    p = _common.parser("sinabs", __doc__.splitlines()[0])
    p.add_argument("--flat-v-leak", action="store_true",
                   help="work around sinabs 3.1.3's `any(node.v_leak)`, which fails on a multi-dimensional "
                        "v_leak (every conv LIF layer under NIR 1.0.8's shape rules): pass v_leak flattened "
                        "to 1-D (sinabs reads it only for that check)")
    args = _common.parse(p, argv)
    import nir
    import sinabs
    import torch
    from _torch import SpikeRecorder, modules_by_nir_name
    if args.check:
        return 0
    torch.set_num_threads(1)
    inputs, steps, dt = _common.load_inputs(args.inputs)
    spiking = None
    runs = []
    with torch.no_grad():
        for part in _common.chunks(len(inputs), args.batch):
            graph = nir.read(args.nir)  # from_nir edits LIF nodes in place; batch_size is fixed per model
            spiking = [n for n, node in graph.nodes.items() if isinstance(node, (nir.LIF, nir.CubaLIF, nir.IF))]
            if args.flat_v_leak:
                for node in graph.nodes.values():
                    if isinstance(node, nir.LIF):
                        node.v_leak = np.asarray(node.v_leak).reshape(-1)
            x = torch.from_numpy(inputs[part])
            batch = len(x)
            model = sinabs.from_nir(graph, batch_size=batch, num_timesteps=steps)
            recorder = SpikeRecorder(modules_by_nir_name(model, spiking))
            sequence = x.unsqueeze(1).expand(batch, steps, *x.shape[1:]).reshape(batch * steps, *x.shape[1:])
            out = model(sequence)
            out = out[0] if isinstance(out, tuple) else out
            logits = out.reshape(batch, steps, -1).transpose(0, 1).float().numpy()
            spikes = {name: np.swapaxes(s[0].reshape(batch, steps, *s.shape[2:]), 0, 1)
                      for name, s in recorder.take().items()}
            runs.append((logits, spikes))
    logits, spikes = _common.concat_runs(runs)
    _common.save(args.out, logits, spikes, {"reader": "sinabs", "version": version("sinabs"),
                                            "settings": {"flat_v_leak": args.flat_v_leak}, "batch": args.batch})
    return 0


if __name__ == "__main__":
    sys.exit(main())
