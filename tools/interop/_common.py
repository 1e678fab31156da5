"""What every tools/interop/run_<reader>.py shares: arguments, the inputs file, the result file.

Each runner runs in its reader's own virtual environment (tools/interop/setup.sh), so this
module needs only numpy and the standard library; it never imports stars_deploy.

Inputs (.npz, written by tests/test_interop.py or by hand):
    inputs   float32 (B, C, H, W): one normalised image per sample, given unchanged at
             every step (direct encoding, the stars-deploy convention)
    T        number of steps per sample
    dt       the integration step in seconds (the graph's metadata dt_s)

Result (.npz):
    logits            float32 (T, B, K): the Output node's value at every step
    spikes/<node>     float32 (T, B, ...): a spiking node's spikes, NIR channel-first layout
                      (only where the reader exposes them)
    info              JSON string: reader, version, nir version, settings used, notes
"""

from __future__ import annotations

import argparse
import json
import sys
from importlib.metadata import version

import numpy as np


def parser(reader: str, description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"run_{reader}.py", description=description)
    p.add_argument("--check", action="store_true", help="only import the reader and exit (setup.sh)")
    p.add_argument("--nir", help="the .nir file")
    p.add_argument("--inputs", help="inputs .npz (inputs (B, C, H, W), T, dt)")
    p.add_argument("--out", help="result .npz to write")
    p.add_argument("--batch", type=int, default=0,
                   help="samples per call to the reader (0: the whole batch at once)")
    return p


def parse(p: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    args = p.parse_args(argv)
    if not args.check and not (args.nir and args.inputs and args.out):
        p.error("--nir, --inputs and --out are required (or --check)")
    return args


def load_inputs(path: str) -> tuple[np.ndarray, int, float]:
    with np.load(path, allow_pickle=False) as archive:
        inputs = np.asarray(archive["inputs"], dtype=np.float32)
        steps, dt = int(archive["T"]), float(archive["dt"])
    if inputs.ndim != 4:
        sys.exit(f"inputs must be (B, C, H, W), got {inputs.shape}")
    return inputs, steps, dt


def chunks(size: int, batch: int):
    """Slices of at most ``batch`` samples (all at once for batch <= 0)."""
    step = size if batch <= 0 else batch
    return [slice(start, min(start + step, size)) for start in range(0, size, step)]


def save(path: str, logits, spikes: dict, info: dict) -> None:
    arrays = {"logits": np.asarray(logits, dtype=np.float32)}
    for name, value in spikes.items():
        arrays[f"spikes/{name}"] = np.asarray(value, dtype=np.float32)
    info = dict(info, nir=version("nir"))
    np.savez(path, info=np.array(json.dumps(info, sort_keys=True)), **arrays)


def concat_runs(runs: list[tuple[np.ndarray, dict]]) -> tuple[np.ndarray, dict]:
    """Join per-chunk (logits (T, b, K), spikes {name: (T, b, ...)}) along the batch axis."""
    logits = np.concatenate([r[0] for r in runs], axis=1)
    spikes = {name: np.concatenate([r[1][name] for r in runs], axis=1) for name in runs[0][1]}
    return logits, spikes
