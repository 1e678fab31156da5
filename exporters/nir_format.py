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
      sha256          the checksum of every other dataset in the file (nir_validate.py defines
                      it): a reader recomputes it and refuses a file whose arrays changed

Time constants are float64 seconds (``tau = tau_steps * dt_s``) so that a reader computing
``1 / tau`` in float64 gets Norse's float32 rate exactly.

Flatten nodes count ``start_dim`` from the end (``start_dim = -3, end_dim = -1`` for a
(C, H, W) input): in NIR's batch-free shapes that is the whole sample, as ``start_dim = 0`` is,
and readers that hand start_dim to ``torch.nn.Flatten`` unchanged (Norse's and snnTorch's
from_nir, nirtorch's default map) then keep the batch dimension instead of flattening it.
Neuron parameters are full-shape arrays even where every value is equal: NIR 1.0.8 takes a
neuron's input type from its parameters' shape, so a scalar or per-channel form fails type
checking (tests/test_interop.py and README list which readers read the file exactly).

Reading validates the whole file before ``nir.read`` allocates it (nir_validate.py: sizes,
node types, dtypes, finiteness, metadata types and ranges, the checksum of our own files).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import h5py
import nir
import numpy as np

from .nir_validate import CHECKSUM_KEY, JSON_KEYS, NIRFormatError, decode_metadata, file_sha256, validate_file

NIR_FORMAT = "stars-deploy/nir-v1"  # the words of the other keys: stars_deploy/vocabulary.py
MAX_FILE_BYTES = 2**31  # more than any graph within nir_validate's bounds needs
METADATA_KEYS = ("format", "dt_s", "integrator", "reset", "state_init", "timesteps", "encoding", "normalization",
                 "class_names", "readout", "spike_layers", "student_family", CHECKSUM_KEY)  # all a writer of ours sets

__all__ = ["NIR_FORMAT", "NIRFormatError", "decode_metadata", "encode_metadata", "nir_bytes", "read_nir", "write_nir"]


WEIGHT_FIELDS = ("weight", "bias")  # the parameters a layer-table row counts


def read_nir(path: Path) -> nir.NIRGraph:
    """The graph of the .nir file at ``path``, validated (nir_validate.validate_file) and then
    read by ``nir.read(path, type_check=True)``; any problem raises NIRFormatError naming the
    file and the node, field or metadata key."""
    path = Path(path)
    if path.is_dir():
        raise NIRFormatError(f"NIR file {path} is a directory: give the .nir file inside it "
                             "(export/student.nir in a run directory)")
    if not path.is_file():
        raise NIRFormatError(f"NIR file {path} does not exist")
    if path.stat().st_size > MAX_FILE_BYTES:
        raise NIRFormatError(f"NIR file {path} is {path.stat().st_size:,} bytes, more than any graph "
                             f"stars-deploy reads ({MAX_FILE_BYTES:,})")
    validate_file(path, own_format=NIR_FORMAT, own_keys=METADATA_KEYS)
    try:
        return nir.read(path, type_check=True)
    except Exception as exc:  # nir's own ValueError/KeyError and type-check failures, after validation
        text = " ".join(str(exc).split()) or type(exc).__name__
        raise NIRFormatError(f"cannot read {path} as a NIR graph: {type(exc).__name__}: {text}") from None


def encode_metadata(metadata: dict) -> dict:
    """Metadata as HDF5-friendly scalars: lists and dicts become JSON strings."""
    return {key: json.dumps(value, sort_keys=True) if key in JSON_KEYS else value
            for key, value in metadata.items()}


def _serialise(graph: nir.NIRGraph, metadata: dict) -> bytes:
    saved = graph.metadata
    graph.metadata = metadata  # written with these, the caller's graph left as it was
    try:
        buffer = io.BytesIO()
        nir.write(buffer, graph)
        return buffer.getvalue()
    finally:
        graph.metadata = saved


def nir_bytes(graph: nir.NIRGraph) -> bytes:
    """The graph serialised by ``nir.write`` as HDF5 bytes, with metadata ``sha256``: the
    checksum of every other dataset (nir_validate.content_sha256), computed from the file as
    written once without it, so the reader hashes exactly what is stored.

    Deterministic: h5py records no object timestamps by default (``track_times=False``), gzip
    output and the checksum depend only on the data; tests/test_export_nir.py checks two
    exports of the same student, a second apart, for byte identity.
    """
    metadata = {key: value for key, value in (graph.metadata or {}).items() if key != CHECKSUM_KEY}
    with h5py.File(io.BytesIO(_serialise(graph, metadata)), "r") as handle:
        digest = file_sha256(handle)
    return _serialise(graph, {**metadata, CHECKSUM_KEY: digest})


def write_nir(path: Path, graph: nir.NIRGraph) -> None:
    """Write ``graph`` to ``path`` atomically and deterministically (readable by ``nir.read``)."""
    from stars_deploy.fileio import write_bytes

    write_bytes(Path(path), nir_bytes(graph))


def graph_layer_table(graph: nir.NIRGraph) -> list[dict]:
    """The layer table of any NIR graph (a foreign file's too): one row per node in edge order."""
    order = []
    for source, target in graph.edges:
        for name in (source, target):
            if name not in order:
                order.append(name)
    order += [name for name in graph.nodes if name not in order]
    rows = []
    for name in order:
        node = graph.nodes[name]
        shape_in = next(iter(node.input_type.values()), None)
        shape_out = next(iter(node.output_type.values()), None)
        params = sum(int(np.asarray(getattr(node, f)).size) for f in WEIGHT_FIELDS if hasattr(node, f))
        row = {"name": name, "type": type(node).__name__,
               "input_shape": None if shape_in is None else [int(s) for s in shape_in],
               "output_shape": None if shape_out is None else [int(s) for s in shape_out], "parameters": params}
        if isinstance(node, nir.Conv2d):
            row.update(kernel=[int(k) for k in node.weight.shape[2:]], stride=[int(s) for s in node.stride])
        rows.append(row)
    return rows
