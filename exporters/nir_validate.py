"""Validation of a .nir file at load, before ``nir.read`` allocates anything, and its checksum.

Every reader of ours goes through ``nir_format.read_nir``, which calls :func:`validate_file`
first. It opens the HDF5 file with h5py in a forked child process with a deadline (the HDF5 C
library can loop forever or crash on a damaged file; then the error says so) and checks, in
this order:

1. sizes, from the declared shapes and dtypes alone (nothing is read yet): at most
   :data:`MAX_NODES` nodes, :data:`MAX_EDGES` edges, :data:`MAX_DATASETS` datasets,
   :data:`MAX_ARRAY_BYTES` bytes of arrays, :data:`MAX_NEURONS` neurons (the size of every
   neuron node's parameters, summed) and :data:`MAX_SYNAPSES` weights (Affine, Linear, Conv,
   Scale elements, summed). A 513 KB file can declare a 10^9-neuron LIF layer (gzip packs
   4 GB of equal values into almost nothing); it is refused here, not after 20 s of
   allocation;
2. structure: the root is a NIRGraph, every node's ``type`` is one NIR 1.0.8 knows and its
   required fields are there, every dataset is numeric or text (no compound, reference or
   object data), edges are (E, 2) names of nodes that exist;
3. values, now that reading them is bounded: every float array finite (NaN/Inf is refused
   naming the node and field), time constants > 0, geometry (stride, dilation, groups,
   kernel_size >= 1, padding >= 0) and shapes (entries >= 1) integers;
4. the graph's metadata: the JSON keys decode, and the words of ``stars_deploy.vocabulary``
   have their types and ranges (``dt_s`` a finite number > 0, ``timesteps`` an integer in
   [1, MAX_TIMESTEPS], ``normalization`` finite means and positive stds, one per input
   channel or one for all, ``class_names`` one string per output, ``spike_layers`` naming
   nodes of the graph);
5. the checksum: files we write carry metadata ``sha256`` (:func:`content_sha256`); when a
   file has one, the arrays must hash to it, so a bit flip is named instead of simulated.
   Files from other tools have no checksum: they are validated (1-4) but cannot be checked
   for corruption.

The checksum (``sha256`` over the arrays, the same key and idea as the netx file's): for every
dataset of the HDF5 file except ``node/metadata/sha256`` itself, in the lexicographic order
of their HDF5 paths, the bytes ``path NUL dtype NUL shape NUL length(8, little-endian)
payload``, where dtype is numpy's little-endian code (``<f4``) or ``str`` for text, shape is
Python's repr of the shape tuple, and payload is the little-endian C-order values (text:
each string as length(8) + UTF-8 bytes). It covers weights, neuron parameters, geometry,
edges, node names (they are in the paths) and the other metadata, and depends only on them,
so an export stays byte-identical for the same student.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import select
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from stars_deploy import vocabulary
from stars_deploy.errors import StarsDeployError
from stars_deploy.students.base import MAX_TIMESTEPS
from stars_deploy.units import binary_size

CHECKSUM_KEY = "sha256"
CHECKSUM_PATH = f"node/metadata/{CHECKSUM_KEY}"
JSON_KEYS = ("normalization", "class_names", "spike_layers")

# Bounds on what a file may make us allocate, above the largest students we distil: measured on
# their exports, a spiking ResNet-110 for 32x32 CIFAR-100 has 1.0 M neurons, 1.7 M weights and
# 31 MiB of arrays (225 nodes); a width-256, depth-5 convnet 0.5 M neurons, 63 M weights, 253 MiB.
MAX_NODES = 4096
MAX_EDGES = 16384
MAX_DATASETS = 65536
MAX_GRAPH_DEPTH = 4  # nested NIRGraph nodes
MAX_ARRAY_BYTES = 2**30  # declared, uncompressed
MAX_NEURONS = 2**24
MAX_SYNAPSES = 2**27
MAX_SHAPE_DIMS = 8
TEXT_ITEM_BYTES = 16  # what one variable-length string counts towards MAX_ARRAY_BYTES before it is read
# The HDF5 library parses the file in C, and a damaged file can make it loop forever (a global
# heap object of size 0: a fuzzed .nir did) or crash. Validation therefore runs in a forked child
# with a deadline of READ_TIMEOUT_S plus the file's size at READ_BYTES_PER_S; only a file that
# the child read in full is then read by nir.read here, along the same code paths.
READ_TIMEOUT_S = 5.0
READ_BYTES_PER_S = 10 * 2**20
CHILD_MESSAGE_BYTES = 4096

# NIR 1.0.8's node types (nir.read's read_node) and the fields nir.read needs from each
REQUIRED_FIELDS = {
    "Affine": ("weight", "bias"), "Linear": ("weight",), "Scale": ("scale",),
    "Conv1d": ("weight", "stride", "padding", "dilation", "groups", "bias"),
    "Conv2d": ("weight", "stride", "padding", "dilation", "groups", "bias"),
    "SumPool2d": ("kernel_size", "stride", "padding"), "AvgPool2d": ("kernel_size", "stride", "padding"),
    "Delay": ("delay",), "Flatten": ("start_dim", "end_dim"), "Threshold": ("threshold",),
    "I": ("r",), "IF": ("r", "v_threshold"), "LI": ("tau", "r", "v_leak"),
    "LIF": ("tau", "r", "v_leak", "v_threshold"), "CubaLI": ("tau_mem", "tau_syn", "r", "v_leak", "w_in"),
    "CubaLIF": ("tau_mem", "tau_syn", "r", "v_leak", "v_threshold", "w_in"),
    "Input": ("shape",), "Output": ("shape",), "NIRGraph": ("nodes",),
}
NEURON_TYPES = ("I", "IF", "LI", "LIF", "CubaLI", "CubaLIF", "Threshold")
SYNAPSE_FIELDS = {"Affine": "weight", "Linear": "weight", "Conv1d": "weight", "Conv2d": "weight", "Scale": "scale"}
TIME_CONSTANTS = ("tau", "tau_mem", "tau_syn")
PARAMETERS = ("weight", "bias", "scale", "threshold", "delay", "r", "v_leak", "v_threshold", "v_reset",
              "w_in") + TIME_CONSTANTS
POSITIVE_GEOMETRY = ("stride", "dilation", "groups", "kernel_size")
SHAPES = ("shape", "input_type", "input_shape")
INTEGER_FIELDS = POSITIVE_GEOMETRY + ("padding", "start_dim", "end_dim") + SHAPES
PADDING_WORDS = ("same", "valid")
TEXT_WORDS = {"reset": None, "integrator": None, "format": None, "student_family": None,
              "encoding": (vocabulary.ENCODING,), "readout": (vocabulary.READOUT,),
              "state_init": (vocabulary.STATE_INIT,)}
SHA256_HEX = re.compile(r"[0-9a-f]{64}")


class NIRFormatError(StarsDeployError):
    """A NIR file or graph that cannot be read, or breaks the conventions a reader assumes."""


@dataclass
class _Budget:
    """What the file declares, summed as the nodes are walked."""

    neurons: int = 0
    synapses: int = 0
    node_names: set[str] = field(default_factory=set)
    input_channels: set[int] = field(default_factory=set)
    output_sizes: set[int] = field(default_factory=set)


@dataclass(frozen=True)
class _Entry:
    """One dataset of the file, described from its header (nothing read)."""

    dataset: h5py.Dataset
    shape: tuple[int, ...]
    dtype: np.dtype
    text: bool

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def declared_bytes(self) -> int:
        return self.size * (TEXT_ITEM_BYTES if self.text else self.dtype.itemsize)


@dataclass(frozen=True)
class _Node:
    where: str  # the name errors use: 'conv1', or 'sub/conv1' inside a nested graph
    kind: str
    path: str  # its HDF5 group


def _where(path: str) -> str:
    """An HDF5 path as the error messages name it: node 'x' field 'y', metadata 'z', or the path."""
    parts = path.split("/")
    if len(parts) == 4 and parts[:2] == ["node", "nodes"]:
        return f"node {parts[2]!r} field {parts[3]!r}"
    if len(parts) == 3 and parts[:2] == ["node", "metadata"]:
        return f"metadata {parts[2]!r}"
    return path


def _text(value) -> str | None:
    if isinstance(value, (bytes, np.bytes_)):
        try:
            return bytes(value).decode("utf8")
        except UnicodeDecodeError:
            return None
    return value if isinstance(value, str) else None


def _collect(source: str, handle: h5py.File) -> dict[str, _Entry]:
    """Every dataset by HDF5 path, from the headers alone; their number bounded, dtypes plain."""
    entries: dict[str, _Entry] = {}

    def visit(name: str, item) -> None:
        if not isinstance(item, h5py.Dataset):
            return
        if len(entries) >= MAX_DATASETS:
            raise NIRFormatError(f"{source}: more than {MAX_DATASETS:,} datasets; this is not a network "
                                 "stars-deploy reads (refused before reading its arrays)")
        if item.shape is None:
            raise NIRFormatError(f"{source}: {_where(name)} is empty (an HDF5 null dataspace); NIR stores "
                                 "every field as an array or scalar: write the file again")
        dtype = item.dtype
        text = h5py.check_string_dtype(dtype) is not None or dtype.kind == "S"
        if not (text or dtype.kind in "biuf"):
            raise NIRFormatError(f"{source}: {_where(name)} has dtype {dtype}, which NIR does not use "
                                 "(numbers or text only)")
        entries[name] = _Entry(item, tuple(item.shape), dtype, text)

    handle.visititems(visit)
    return entries


def _node_type(source: str, entries: dict[str, _Entry], handle: h5py.File, path: str, where: str) -> str:
    entry = entries.get(f"{path}/type")
    if entry is None or not entry.text or entry.shape != ():
        raise NIRFormatError(f"{source}: node {where!r} has no type (a text dataset 'type'); it is not a NIR node")
    kind = _text(entry.dataset[()])
    if kind not in REQUIRED_FIELDS:
        raise NIRFormatError(f"{source}: node {where!r} has type {kind!r}, which NIR 1.0.8 does not define "
                             f"(known: {', '.join(sorted(REQUIRED_FIELDS))})")
    group = handle[path]
    missing = [name for name in REQUIRED_FIELDS[kind] if name not in group]
    if missing:
        raise NIRFormatError(f"{source}: node {where!r} ({kind}) lacks {', '.join(missing)}; "
                             "the file is incomplete: write it again")
    return kind


def _nodes(source: str, entries: dict[str, _Entry], handle: h5py.File, path: str, depth: int,
           seen: list[int]) -> list[_Node]:
    """Every node of the graph at ``path`` and of the graphs nested in it; ``seen`` counts them
    all against MAX_NODES."""
    if depth > MAX_GRAPH_DEPTH:
        raise NIRFormatError(f"{source}: graphs nested more than {MAX_GRAPH_DEPTH} deep")
    nodes = handle[f"{path}/nodes"]
    if not isinstance(nodes, h5py.Group):
        raise NIRFormatError(f"{source}: {path}/nodes is not a group of nodes")
    seen[0] += len(nodes)
    if seen[0] > MAX_NODES:
        raise NIRFormatError(f"{source}: more than {MAX_NODES:,} nodes; this is not a network stars-deploy reads")
    found = []
    for name in sorted(nodes.keys()):
        where = name if depth == 0 else f"{path.removeprefix('node/nodes/')}/{name}"
        node_path = f"{path}/nodes/{name}"
        if not isinstance(nodes.get(name), h5py.Group):
            raise NIRFormatError(f"{source}: node {where!r} is not a group of fields")
        node = _Node(where, _node_type(source, entries, handle, node_path, where), node_path)
        found.append(node)
        if node.kind == "NIRGraph":
            found += _nodes(source, entries, handle, node_path, depth + 1, seen)
    return found


def _by_group(entries: dict[str, _Entry]) -> dict[str, dict[str, _Entry]]:
    """{group path: {dataset name: entry}}: a node's own fields are its group's datasets."""
    groups: dict[str, dict[str, _Entry]] = {}
    for path, entry in entries.items():
        parent, _, name = path.rpartition("/")
        groups.setdefault(parent, {})[name] = entry
    return groups


def _check_sizes(source: str, node: _Node, fields: dict[str, _Entry], budget: _Budget) -> None:
    """Neurons and weights from the declared shapes: absurd graphs are refused before reading."""
    if node.kind in NEURON_TYPES:
        size = max((entry.size for name, entry in fields.items() if name in PARAMETERS), default=0)
        budget.neurons += size
        if budget.neurons > MAX_NEURONS:
            raise NIRFormatError(
                f"{source}: node {node.where!r} ({node.kind}) declares {size:,} neurons ({budget.neurons:,} in the "
                f"graph so far); a graph may have at most {MAX_NEURONS:,}. Refused before allocating: this is "
                "not a network the simulators can run")
    if SYNAPSE_FIELDS.get(node.kind) in fields:
        size = fields[SYNAPSE_FIELDS[node.kind]].size
        budget.synapses += size
        if budget.synapses > MAX_SYNAPSES:
            raise NIRFormatError(
                f"{source}: node {node.where!r} ({node.kind}) declares {size:,} weights ({budget.synapses:,} in "
                f"the graph so far); a graph may have at most {MAX_SYNAPSES:,}. Refused before allocating")


def _check_bytes(source: str, entries: dict[str, _Entry]) -> None:
    total = 0
    for path, entry in entries.items():
        total += entry.declared_bytes
        if total > MAX_ARRAY_BYTES:
            raise NIRFormatError(
                f"{source}: the arrays declare {binary_size(total)} or more (at {_where(path)}, {entry.shape} "
                f"{entry.dtype}: {binary_size(entry.declared_bytes)}); a graph may hold at most "
                f"{binary_size(MAX_ARRAY_BYTES)}. Refused before allocating: this is not a network the "
                "simulators can run")


def _shape_of(entry: _Entry | None) -> np.ndarray | None:
    """An Input/Output shape read on its own (before the other arrays), if it is a small integer array."""
    if entry is None or entry.text or entry.size > MAX_SHAPE_DIMS:
        return None
    shape = np.asarray(entry.dataset[()]).ravel()
    return shape if np.all(shape >= 1) and np.all(shape == np.round(shape)) else None


def _check_field(source: str, node: _Node, name: str, entry: _Entry, value) -> None:
    """Dtype, finiteness and range of one node field (its value already read)."""
    label = f"node {node.where!r} ({node.kind}) field {name!r}"
    if name == "padding" and entry.text:
        if _text(value) not in PADDING_WORDS:
            raise NIRFormatError(f"{source}: {label} is {_text(value)!r}; padding is integers or "
                                 f"{' or '.join(PADDING_WORDS)}")
        return
    if name not in PARAMETERS and name not in INTEGER_FIELDS:
        return  # a field nir.read does not read
    if entry.text or entry.dtype.kind == "b":
        raise NIRFormatError(f"{source}: {label} is {entry.dtype} data; it must be numbers")
    array = np.asarray(value)
    if array.dtype.kind == "f" and not np.all(np.isfinite(array)):
        bad = int(np.count_nonzero(~np.isfinite(array)))
        # worded as the Loihi lowering words it (loihi_export), so both name the node the same way
        raise NIRFormatError(f"{source}: node {node.where!r} has {bad:,} NaN or Inf {name} value(s) of "
                             f"{array.size:,} ({node.kind} field {name!r}); it cannot be simulated or lowered: "
                             "export it again from finite weights")
    if name in TIME_CONSTANTS and array.size and float(array.min()) <= 0:
        raise NIRFormatError(f"{source}: {label} has time constants down to {float(array.min()):g} s; "
                             "time constants must be > 0")
    if name not in INTEGER_FIELDS:
        return
    if array.ndim > 1 or array.size > MAX_SHAPE_DIMS or np.any(array != np.round(array)):
        shown = array.tolist() if array.size <= MAX_SHAPE_DIMS else f"an array of shape {array.shape}"
        raise NIRFormatError(f"{source}: {label} must be at most {MAX_SHAPE_DIMS} integers, got {shown}")
    if name in POSITIVE_GEOMETRY + SHAPES and np.any(array < 1):
        raise NIRFormatError(f"{source}: {label} is {array.tolist()}; it must be integers >= 1")
    if name == "padding" and np.any(array < 0):
        raise NIRFormatError(f"{source}: {label} is {array.tolist()}; padding must be >= 0")
    if name in SHAPES and math.prod(int(s) for s in array.ravel()) > MAX_NEURONS:
        raise NIRFormatError(f"{source}: {label} declares {array.tolist()}, more than {MAX_NEURONS:,} "
                             "values per sample; this is not a network the simulators can run")


def _check_edges(source: str, handle: h5py.File, entries: dict[str, _Entry], path: str, values: dict) -> None:
    """The edges of the graph at ``path``: (E, 2) names of its own nodes."""
    entry = entries.get(f"{path}/edges")
    if entry is None:
        raise NIRFormatError(f"{source}: graph {path} has no edges dataset; the file is incomplete")
    if entry.shape == (0,):  # nir.write stores an empty edge list as an empty float array
        return
    if len(entry.shape) != 2 or entry.shape[1] != 2 or not entry.text:
        raise NIRFormatError(f"{source}: edges must be (E, 2) node names, got {entry.shape} {entry.dtype}")
    if entry.shape[0] > MAX_EDGES:
        raise NIRFormatError(f"{source}: {entry.shape[0]:,} edges, more than {MAX_EDGES:,}; "
                             "this is not a network stars-deploy reads")
    names = set(handle[f"{path}/nodes"].keys())
    for pair in np.asarray(values[f"{path}/edges"]):
        for end in pair:
            if _text(end) not in names:
                raise NIRFormatError(f"{source}: edge {[_text(e) for e in pair]} names node {_text(end)!r}, "
                                     "which is not in the graph")


def decode_metadata(metadata: dict | None, source: str = "graph") -> dict:
    """Graph metadata as read back by ``nir.read`` (bytes, numpy scalars, JSON text) as Python
    values; a JSON key that does not decode raises NIRFormatError naming it."""
    decoded = {}
    for key, value in (metadata or {}).items():
        if isinstance(value, (bytes, np.bytes_)):
            text = _text(value)
            if text is None:
                raise NIRFormatError(f"{source}: metadata {key!r} is not UTF-8 text")
            value = text
        if isinstance(value, np.generic):
            value = value.item()
        if key in JSON_KEYS:
            if not isinstance(value, str):
                raise NIRFormatError(f"{source}: metadata {key!r} must be JSON text, got {type(value).__name__}")
            try:
                value = json.loads(value)
            except (json.JSONDecodeError, RecursionError) as exc:
                raise NIRFormatError(f"{source}: metadata {key!r} is not valid JSON ({exc}); "
                                     "write the file again") from None
        decoded[key] = value
    return decoded


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _finite_numbers(value) -> bool:
    return isinstance(value, list) and bool(value) and all(_is_number(v) and math.isfinite(v) for v in value)


def check_metadata(metadata: dict, source: str, node_names: set[str] | None = None,
                   input_channels: set[int] = frozenset(), output_sizes: set[int] = frozenset()) -> None:
    """Types and ranges of the decoded metadata words (module docstring, step 4)."""
    if vocabulary.DT_KEY in metadata:
        dt_s = metadata[vocabulary.DT_KEY]
        if not _is_number(dt_s) or not math.isfinite(dt_s) or dt_s <= 0:
            raise NIRFormatError(f"{source}: metadata {vocabulary.DT_KEY} = {dt_s!r}; it must be a finite number "
                                 "of seconds > 0")
    if "timesteps" in metadata:
        steps = metadata["timesteps"]
        if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= MAX_TIMESTEPS:
            raise NIRFormatError(f"{source}: metadata timesteps = {steps!r}; it must be an integer in "
                                 f"[1, {MAX_TIMESTEPS}]")
    if "normalization" in metadata:
        norm = metadata["normalization"]
        if not isinstance(norm, dict) or not _finite_numbers(norm.get("mean")) or not _finite_numbers(norm.get("std")) \
                or len(norm["mean"]) != len(norm["std"]) or min(norm["std"]) <= 0:
            raise NIRFormatError(f"{source}: metadata normalization must be {{\"mean\": [...], \"std\": [...]}} of "
                                 "equal length, finite, std > 0")
        channels = len(norm["mean"])
        if channels != 1 and input_channels and channels not in input_channels:
            raise NIRFormatError(f"{source}: metadata normalization has {channels} channels but the input has "
                                 f"{sorted(input_channels)[0]}")
    if "class_names" in metadata:
        names = metadata["class_names"]
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise NIRFormatError(f"{source}: metadata class_names must be a JSON list of strings")
        if output_sizes and len(names) not in output_sizes:
            raise NIRFormatError(f"{source}: metadata class_names has {len(names)} names but the output has "
                                 f"{sorted(output_sizes)[0]} values")
    if "spike_layers" in metadata:
        spikes = metadata["spike_layers"]
        if not isinstance(spikes, dict) or not all(isinstance(v, str) for v in spikes.values()):
            raise NIRFormatError(f"{source}: metadata spike_layers must be a JSON object of node name -> name")
        unknown = sorted(set(spikes) - node_names) if node_names is not None else []
        if unknown:
            raise NIRFormatError(f"{source}: metadata spike_layers names node {unknown[0]!r}, which is not in the graph")
    for key, allowed in TEXT_WORDS.items():
        if key in metadata:
            if not isinstance(metadata[key], str):
                raise NIRFormatError(f"{source}: metadata {key} must be text, got {metadata[key]!r}")
            if allowed is not None and metadata[key] not in allowed:
                raise NIRFormatError(f"{source}: metadata {key} = {metadata[key]!r}; stars-deploy's readers "
                                     f"support {' or '.join(map(repr, allowed))} only")
    if CHECKSUM_KEY in metadata and not (isinstance(metadata[CHECKSUM_KEY], str)
                                         and SHA256_HEX.fullmatch(metadata[CHECKSUM_KEY])):
        raise NIRFormatError(f"{source}: metadata {CHECKSUM_KEY} is not a sha256 hex digest; the file is corrupt")


def _payload(value) -> tuple[str, tuple, bytes]:
    """(dtype code, shape, bytes) of one dataset's value, as the checksum hashes it."""
    array = np.asarray(value)
    if array.dtype.kind in "OSU":
        items = [bytes(item) if isinstance(item, (bytes, np.bytes_)) else str(item).encode("utf8")
                 for item in array.ravel()]
        return "str", array.shape, b"".join(len(item).to_bytes(8, "little") + item for item in items)
    little = array.dtype.newbyteorder("<")
    return little.str, array.shape, np.ascontiguousarray(array, dtype=little).tobytes()


def content_sha256(values: dict[str, Any]) -> str:
    """sha256 of the datasets ``{HDF5 path: value}`` (module docstring), the checksum itself excluded."""
    digest = hashlib.sha256()
    for path in sorted(values):
        if path == CHECKSUM_PATH:
            continue
        dtype, shape, payload = _payload(values[path])
        digest.update(b"\0".join((path.encode("utf8"), dtype.encode(), repr(tuple(shape)).encode(),
                                  len(payload).to_bytes(8, "little") + payload)))
    return digest.hexdigest()


def file_sha256(handle: h5py.File, source: str = "graph") -> str:
    """The checksum of an open NIR file (what the writer stores as metadata sha256)."""
    return content_sha256({path: entry.dataset[()] for path, entry in _collect(source, handle).items()})


def validate_file(path: Path, source: str | None = None, own_format: str | None = None,
                  own_keys: tuple[str, ...] = ()) -> None:
    """Steps 1-5 of the module docstring for the .nir file at ``path``; raises NIRFormatError
    naming the file and the node, field or metadata key. Nothing is allocated beyond the bounds.
    A file whose metadata format is ``own_format`` (ours) may hold only the metadata keys
    ``own_keys``: a key whose name a bit flip changed (sha256 -> sha2R6) is refused, not skipped.
    Where the OS can fork, the HDF5 library reads the file in a child process (READ_TIMEOUT_S)."""
    source = source or str(path)
    if not hasattr(os, "fork"):
        return _validate_here(path, source, own_format, own_keys)
    deadline_s = READ_TIMEOUT_S + Path(path).stat().st_size / READ_BYTES_PER_S
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: validate, report one message, never return into the parent's code
        status = 3
        try:
            os.close(read_end)
            message = b""
            try:
                _validate_here(path, source, own_format, own_keys)
                status = 0
            except NIRFormatError as exc:
                status, message = 1, str(exc).encode("utf8", "replace")
            except BaseException as exc:  # a bug of ours, shown to the parent as one
                status, message = 2, f"{type(exc).__name__}: {exc}".encode("utf8", "replace")
            os.write(write_end, message[:CHILD_MESSAGE_BYTES])
        finally:
            os._exit(status)  # no exit hooks, no flushing of the parent's buffers
    os.close(write_end)
    try:
        status, message = _wait_for_child(pid, read_end, deadline_s)
    except BaseException:  # e.g. Ctrl-C while waiting: a looping child must not outlive us
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        raise
    finally:
        os.close(read_end)
    if status == "timeout":
        raise NIRFormatError(f"cannot read {source} as a NIR graph: the HDF5 library did not finish reading it in "
                             f"{deadline_s:.0f} s (a damaged file can make it loop): the file is corrupt; export it again")
    if os.WIFSIGNALED(status):
        raise NIRFormatError(f"cannot read {source} as a NIR graph: the HDF5 library crashed reading it (signal "
                             f"{os.WTERMSIG(status)}): the file is corrupt; export it again")
    code = os.WEXITSTATUS(status)
    if code == 1:
        raise NIRFormatError(message)
    if code != 0:
        raise RuntimeError(f"validating {source} failed in the reader itself: {message}")


def _wait_for_child(pid: int, read_end: int, deadline_s: float) -> tuple[int | str, str]:
    """(wait status or "timeout", the child's message); a child past its deadline is killed."""
    chunks, end = [], time.monotonic() + deadline_s
    while True:
        remaining = end - time.monotonic()
        ready, _, _ = select.select([read_end], [], [], max(0.0, remaining))
        if not ready:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return "timeout", ""
        chunk = os.read(read_end, CHILD_MESSAGE_BYTES)
        if not chunk:  # the child closed its end: it has exited, or is exiting
            break
        chunks.append(chunk)
    _, status = os.waitpid(pid, 0)
    return status, b"".join(chunks).decode("utf8", "replace")


def _validate_here(path: Path, source: str, own_format: str | None, own_keys: tuple[str, ...]) -> None:
    try:
        handle = h5py.File(path, "r")
    except OSError as exc:
        raise NIRFormatError(f"cannot read {source} as a NIR graph: not an HDF5 file, or truncated "
                             f"({_first_line(exc)})") from None
    with handle:
        try:
            _validate_open_file(source, handle, own_format, own_keys)
        except NIRFormatError:
            raise
        except (OSError, KeyError, ValueError, RuntimeError, TypeError, IndexError) as exc:
            # h5py on a damaged file: a filter (gzip) failure, a broken object header or heap
            raise NIRFormatError(f"cannot read {source} as a NIR graph: the file is corrupt "
                                 f"({type(exc).__name__}: {_first_line(exc)}); export it again") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _validate_open_file(source: str, handle: h5py.File, own_format: str | None, own_keys: tuple[str, ...]) -> None:
    if not isinstance(handle.get("node"), h5py.Group):
        raise NIRFormatError(f"{source} is an HDF5 file without a NIR graph (no group 'node')")
    entries = _collect(source, handle)
    if _node_type(source, entries, handle, "node", "node") != "NIRGraph":
        raise NIRFormatError(f"{source}: the root node is not a NIRGraph")
    nodes = _nodes(source, entries, handle, "node", 0, [0])
    groups = _by_group(entries)
    fields = {node.path: {name: entry for name, entry in groups.get(node.path, {}).items() if name != "type"}
              for node in nodes}
    budget = _Budget()
    for node in nodes:  # 1. declared neurons and weights, then bytes: nothing read yet
        _check_sizes(source, node, fields[node.path], budget)
    _check_bytes(source, entries)
    for node in nodes:
        if "/" not in node.where:
            budget.node_names.add(node.where)
            shape = _shape_of(fields[node.path].get("shape")) if node.kind in ("Input", "Output") else None
            if shape is not None and node.kind == "Input" and shape.size:
                budget.input_channels.add(int(shape[0]))
            if shape is not None and node.kind == "Output":
                budget.output_sizes.add(math.prod(int(s) for s in shape))
    values = {path: entry.dataset[()] for path, entry in entries.items()}  # bounded now
    for node in nodes:  # 3. values
        for name, entry in fields[node.path].items():
            _check_field(source, node, name, entry, values[f"{node.path}/{name}"])
    for graph in ["node"] + [node.path for node in nodes if node.kind == "NIRGraph"]:
        _check_edges(source, handle, entries, graph, values)
    raw = {path.removeprefix("node/metadata/"): value for path, value in values.items()
           if path.startswith("node/metadata/") and path.count("/") == 2}
    metadata = decode_metadata(raw, source)  # 4.
    unknown = sorted(set(metadata) - set(own_keys)) if own_format and metadata.get("format") == own_format else []
    if unknown:
        raise NIRFormatError(f"{source}: metadata {unknown[0]!r} is not a key {own_format} files have: the file "
                             "is corrupt or was edited; export it again")
    check_metadata(metadata, source, budget.node_names, budget.input_channels, budget.output_sizes)
    if CHECKSUM_KEY in metadata:  # 5.
        computed = content_sha256(values)
        if computed != metadata[CHECKSUM_KEY]:
            raise NIRFormatError(
                f"{source}: checksum mismatch: the arrays hash to sha256 {computed[:12]}..., the file says "
                f"{metadata[CHECKSUM_KEY][:12]}...; it was modified or corrupted after it was written: "
                "export it again")
