"""Run a NIR file in Spyx's own importer: ``spyx.nir.from_nir(graph, input_data, dt=dt)``.

Reader-side settings: ``dt`` (from_nir's argument, default 1 there; here the inputs file's dt,
the graph's metadata dt_s) and the input layout: Spyx runs channels-last, so the (B, C, H, W)
inputs are given as (T, B, H, W, C), the same image at every step (time-major, as its
``run`` scans). from_nir builds and runs the model in one call and returns (T, B, K); it
exposes no per-layer spikes. Spyx's LIF (spyx.nn.LIF) takes beta = 1 - dt/tau and the
threshold from the file and ignores r, v_leak and v_reset: V = beta V + x - s * threshold
with s = H(V_prev - threshold), i.e. it spikes on the previous step's voltage and resets by
subtraction; spyx.nn.Flatten flattens (H, W, C) order, while the following Affine's weights
are in NIR's (C, H, W) order.

    .venv-interop/spyx/bin/python tools/interop/run_spyx.py --nir s.nir --inputs in.npz --out out.npz
"""

from __future__ import annotations

import os
import sys
from importlib.metadata import version

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")

import numpy as np  # noqa: E402

import _common  # noqa: E402


def main(argv=None) -> int:
    p = _common.parser("spyx", __doc__.splitlines()[0])
    p.add_argument("--dt", type=float, default=None, help="dt passed to from_nir (default: the inputs' dt)")
    args = _common.parse(p, argv)
    import jax.numpy as jnp
    import nir
    import spyx.nir
    if args.check:
        return 0
    inputs, steps, dt = _common.load_inputs(args.inputs)
    dt = dt if args.dt is None else args.dt
    runs = []
    for part in _common.chunks(len(inputs), args.batch):
        graph = nir.read(args.nir)  # from_nir rewrites recurrent subgraphs in place
        nhwc = np.transpose(inputs[part], (0, 2, 3, 1))
        sequence = jnp.asarray(np.broadcast_to(nhwc, (steps, *nhwc.shape)))
        _, outputs = spyx.nir.from_nir(graph, sequence, dt=dt)
        runs.append((np.asarray(outputs, dtype=np.float32).reshape(steps, len(nhwc), -1), {}))
    logits, spikes = _common.concat_runs(runs)
    _common.save(args.out, logits, spikes, {"reader": "spyx", "version": version("spyx"),
                                            "settings": {"dt": dt, "layout": "NHWC"}, "batch": args.batch,
                                            "jax": version("jax")})
    return 0


if __name__ == "__main__":
    sys.exit(main())
