"""The stars-deploy NIR file: graph metadata, conventions and a deterministic writer.

The file is an ordinary NIR 1.0.8 HDF5 file (``nir.read`` reads it); what NIR leaves open is
written into the graph's metadata, and every reader of ours validates it:

    metadata/
      format          "stars-deploy/nir-v1"
      dt_s            step of the explicit Euler integration, seconds (NIR has no dt field)
      integrator      "euler-norse": per step, v += dt/tau_mem * (r*x + v_leak - v) (LIF) or
                      i += w_in*x; v += dt/tau_mem * ((v_leak - v) + r*i); i -= dt/tau_syn * i
                      (CubaLIF), spike when v - v_threshold > 0 (strict), then v = v_reset
      reset           "value": v = v_reset after a spike (NIR's own semantics)
      state_init      "v_leak": v starts at v_leak, i at 0, at the start of every sample
      timesteps       T, steps per sample
      encoding        "direct": the Input node receives the normalised image at every step
      normalization   JSON {"mean": [...], "std": [...]}: Input = (image - mean) / std,
                      images in [0, 1] (NCHW)
      class_names     JSON list, one per Output element
      readout         "mean": the prediction is argmax of the Output node's mean over T
      spike_layers    JSON {NIR node name: student spike name} for every spiking node

Time constants are float64 seconds (``tau = tau_steps * dt_s``) so that a reader computing
``1 / tau`` in float64 gets Norse's float32 rate exactly.

Flatten nodes count ``start_dim`` from the end (``start_dim = -3, end_dim = -1`` for a
(C, H, W) input): in NIR's batch-free shapes that is the whole sample, as ``start_dim = 0`` is,
and readers that hand start_dim to ``torch.nn.Flatten`` unchanged (Norse's and snnTorch's
from_nir, nirtorch's default map) then keep the batch dimension instead of flattening it.
Neuron parameters are full-shape arrays even where every value is equal: NIR 1.0.8 takes a
neuron's input type from its parameters' shape, so a scalar or per-channel form fails type
checking (tests/test_interop.py and README list which readers read the file exactly).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import nir
import numpy as np

from stars_deploy.errors import StarsDeployError

NIR_FORMAT = "stars-deploy/nir-v1"  # the words of the other keys: stars_deploy/vocabulary.py
JSON_KEYS = ("normalization", "class_names", "spike_layers")


class NIRFormatError(StarsDeployError):
    """A NIR file or graph that cannot be read, or breaks the conventions a reader assumes."""


def read_nir(path: Path) -> nir.NIRGraph:
    """``nir.read(path, type_check=True)``; a missing or unreadable file raises NIRFormatError."""
    path = Path(path)
    if not path.is_file():
        raise NIRFormatError(f"NIR file {path} does not exist")
    try:
        return nir.read(path, type_check=True)
    except Exception as exc:  # h5py, nir's own ValueError/KeyError, type-check failures
        raise NIRFormatError(f"cannot read {path} as a NIR graph: {type(exc).__name__}: {exc}") from None


def encode_metadata(metadata: dict) -> dict:
    """Metadata as HDF5-friendly scalars: lists and dicts become JSON strings."""
    return {key: json.dumps(value, sort_keys=True) if key in JSON_KEYS else value
            for key, value in metadata.items()}


def decode_metadata(metadata: dict | None) -> dict:
    """The inverse of :func:`encode_metadata` for a graph read back by ``nir.read``."""
    decoded = {}
    for key, value in (metadata or {}).items():
        if isinstance(value, bytes):
            value = value.decode()
        if isinstance(value, np.generic):
            value = value.item()
        if key in JSON_KEYS and isinstance(value, str):
            value = json.loads(value)
        decoded[key] = value
    return decoded


def nir_bytes(graph: nir.NIRGraph) -> bytes:
    """The graph serialised by ``nir.write`` as HDF5 bytes.

    Deterministic: h5py records no object timestamps by default (``track_times=False``) and
    gzip output depends only on the data; tests/test_export_nir.py checks two exports of the
    same student, a second apart, for byte identity.
    """
    buffer = io.BytesIO()
    nir.write(buffer, graph)
    return buffer.getvalue()


def write_nir(path: Path, graph: nir.NIRGraph) -> None:
    """Write ``graph`` to ``path`` atomically and deterministically (readable by ``nir.read``)."""
    from stars_deploy.fileio import write_bytes

    write_bytes(Path(path), nir_bytes(graph))
