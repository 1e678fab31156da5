r"""The ``.net`` file: a lava-dl netx HDF5 network, ours or another tool's, validated at load.

``lava.lib.dl.netx.hdf5.Network(path)`` loads the file as it is; the ``stars`` group is ours
(netx reads only ``layer``). Shapes are (C, H, W) or (N,) as in torch (netx reverses them to
Lava's (W, H, C)); conv weights are torch's (out, in, kH, kW) layout (netx flips the kernel and
Lava's conv flips it back, so the file holds torch's cross-correlation kernel)::

    layer/
      0/  type "input", shape (C, H, W) or (N,)
          neuron/ type "CUBA", iDecay, vDecay, vThMant, refDelay 1, gradedSpike 0
      i/  type "conv": shape (out), weight (int, out x in x kH x kW), bias (int, per channel),
                       stride (2,), padding (2,), dilation (2,), groups, neuron/ as above
          type "flatten"                     (the next dense layer reads the flattened layer)
          type "dense": shape (N,), weight (int, N x inputs), bias (int, N), neuron/ as above
    stars/
      metadata        JSON string: format, sha256, dt_s, timesteps, class_names, normalization,
                      readout ("current": logits from the last layer's u, "spikes"),
                      pipeline_delay_steps, layers [{spike_name, exponent, spiking}], report
      input/          the off-chip first synaptic layer (direct encoding), float64:
                      kind ("conv" | "dense"), weight, bias, stride, padding, dilation, groups,
                      current_scale, current_offset (bias mantissa = round(scale*c + offset))

Loihi neuron fields (netx semantics, the bit-accurate model adds du's 1 back):
``du = iDecay - 1``, ``dv = vDecay``, threshold ``vThMant << 6``, bias ``bias << 6``.

**Checksum** (format ``stars-deploy/netx-v2``). ``metadata["sha256"]`` is the SHA-256 of, for
every dataset of the file except ``stars/metadata``, in the order of their paths sorted as
strings (``layer/0/neuron/iDecay`` ... ``stars/input/weight``): the path (UTF-8), a NUL byte,
the dtype as numpy spells it (``<i8``), the shape as text (``(16, 64)``), a NUL byte and the
values' bytes in C order; then the metadata itself as JSON with sorted keys and without the
``sha256`` key. :func:`read_network` recomputes it, so a bit flip anywhere in our own file's
numbers or metadata is an error; ``stars-deploy/netx-v1`` files (written before the
checksum) are read without one.

**Validation** (:func:`read_network`, before anything is computed; every failure is one
:class:`NetxFormatError` naming the file, the layer and the field). For our files and for
netx files of other tools alike:

=================  ==========================================  =================================
field              range / rule                                 why
=================  ==========================================  =================================
layer type         input, conv, dense, flatten                  pool, convT, unpool, average,
                                                                concat, dense_rec, dense_comp
                                                                are refused by name
neuron type        CUBA, LOIHI                                  SDNN (sigma-delta), RF, RF_IZ
                                                                refused by name
iDecay             integer 0..4096                              12-bit decay, du = iDecay - 1
vDecay             integer 0..4095                              12-bit decay
vThMant            integer 0..131071                            17-bit mantissa: vThMant << 6
                                                                stays inside the 24-bit v
refDelay           1 (or absent)                                netx's LIF has no refractory
                                                                period: other values would run
                                                                differently on the chip
gradedSpike        false / 0 (or absent); messageBits 0         Lava's LIF sends binary spikes
wgtExp (LOIHI)     0 (or absent)                                netx ignores it; the chip would
                                                                scale the weights
weight             integers -256..254 (integral floats too,     8-bit mantissa (netx's even
                   as lava-dl writes them), finite              weights; dense odd weights take
                                                                netx's 9-bit path)
bias               integers -4096..4095                          13-bit mantissa, exponent 6
shapes             (N,) or (C, H, W), 1..2^24 neurons;           a weight shape that does not
                   dense weight (N, inputs of the layer          fit the layers around it is
                   before), conv weight (out, in/groups, kH,     refused
                   kW[, 1]), conv output = the layer's shape
stride, padding,   integers 1..127, 0..127, 1..127; groups      Lava's int8 conv fields
dilation, groups   divides in and out channels
delay              absent                                       synaptic delays are not emulated
=================  ==========================================  =================================

Our files also need their metadata (``layers`` one entry per layer, ``timesteps`` >= 1,
``readout`` matching the last layer, finite input stage whose output has the input layer's
shape). A file without a ``stars`` group is another tool's (lava-dl's own ``.net`` files):
it has no off-chip input stage, so its inputs are the user's (``--inputs FILE.npz``, see
targets/loihi.py ``CONVENTIONS``); its number of steps is ``simulation/tSample`` when the
file has one; every layer's spikes are recorded and the last layer's spike counts are the
logits. netx ignores an input layer's ``weight``/``bias`` (slayer's input transform): the
given inputs are that layer's synaptic input as they are, and the reader says so in the
metadata's ``notes``.

Direct encoding (our files): the first synaptic layer runs off-chip, once per sample, in float64 on the
CPU (``targets/loihi.py: input_current``); its output ``c`` becomes one 13-bit integer per
input-layer neuron, ``clip(round(current_scale * c + current_offset), -4096, 4095)``
(``input_bias_mantissa``), that both the emulator and the Lava runner inject unchanged as
the neuron's synaptic input ``a_in`` at every step of the sample. With ``iDecay = 4096``
(``u = a_in << 6``) that is, bit for bit, a per-neuron bias of the same mantissa (bias << 6):
the 13-bit range keeps both readings valid (a bias on Loihi 1, a graded input on Loihi 2).
The input layer has no synaptic layer of its own (netx's input block leaves its port
unconnected), so its v integrates that constant drive like the student's first LIF
integrates its constant input current.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from stars_deploy.errors import StarsDeployError
from stars_deploy.hardware.loihi import (BIAS_MANT_MAX, BIAS_MANT_MIN, GRADED_SPIKE, I_DECAY_MAX,
                                         REFRACTORY_DELAY_STEPS, THRESHOLD_MANT_MAX, V_DECAY_MAX, WEIGHT_MAX,
                                         WEIGHT_MIN)

NETX_FORMAT = "stars-deploy/netx-v2"
UNCHECKSUMMED_FORMATS = ("stars-deploy/netx-v1",)  # ours, written before the checksum
FOREIGN_FORMAT = "netx"  # the metadata format of a file another tool wrote
STRING_DTYPE = "S10"
CHECKSUM_KEY = "sha256"
METADATA_PATH = "stars/metadata"

LAYER_TYPES = ("input", "conv", "dense", "flatten")
REFUSED_LAYERS = {
    "pool": "pooling layers (netx cannot load them either)", "convT": "transposed convolutions",
    "unpool": "unpooling layers", "average": "averaging layers", "concat": "concatenation layers",
    "dense_rec": "recurrent dense layers", "dense_comp": "complex-valued dense layers",
}
NEURON_TYPES = ("CUBA", "LOIHI")
REFUSED_NEURONS = {"SDNN": "sigma-delta (SDNN) neurons", "RF": "resonate-and-fire (RF) neurons",
                   "RF_IZ": "resonate-and-fire Izhikevich (RF_IZ) neurons",
                   "ALIF": "adaptive LIF (ALIF) neurons", "ADRF": "adaptive resonate-and-fire neurons"}
NEURON_KEYS = {"type", "iDecay", "vDecay", "vThMant", "refDelay", "gradedSpike", "messageBits", "wgtExp"}
TRAINING_ONLY_KEYS = {"theta", "tauRho", "scaleRho"}  # slayer's surrogate-gradient parameters: no effect on the chip
LAYER_KEYS = {
    "input": {"type", "shape", "neuron", "weight", "bias"},
    "conv": {"type", "shape", "neuron", "weight", "bias", "stride", "padding", "dilation", "groups",
             "inChannels", "outChannels", "kernelSize"},
    "dense": {"type", "shape", "neuron", "weight", "bias", "inFeatures", "outFeatures"},
    "flatten": {"type"},
}
MAX_LAYER_NEURONS = 1 << 24  # far above any chip's neurons; bounds what a run allocates per sample
CONV_FIELD_MAX = 127  # Lava's conv keeps kernel, stride, padding, dilation and groups as int8
MAX_EXPONENT = 64  # |weight exponent| of a layer: 2^64 is beyond any weight or threshold scale


class NetxFormatError(StarsDeployError):
    """A .net file that cannot be read, breaks a Loihi field's range, or holds what the
    emulator and the Lava target do not run."""


@dataclass
class NeuronConfig:
    """One CUBA neuron group as netx reads it (all integers)."""

    i_decay: int  # 0..4096, netx passes du = iDecay - 1
    v_decay: int  # 0..4095
    v_th_mant: int  # 0..131071, effective threshold vThMant << 6


@dataclass
class NetxLayer:
    kind: str  # "input", "conv", "dense"
    shape: tuple[int, ...]  # (C, H, W) or (N,)
    neuron: NeuronConfig
    weight: np.ndarray | None = None  # int64
    bias: np.ndarray | None = None  # int64 per channel / neuron
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1
    flatten_before: bool = False


@dataclass
class InputStage:
    """The off-chip first synaptic layer: c = conv(x) + b (or W x + b), float64."""

    kind: str
    weight: np.ndarray
    bias: np.ndarray
    current_scale: float
    current_offset: float
    input_shape: tuple[int, ...]
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1


@dataclass
class NetxNetwork:
    """The layers, and either our off-chip input stage (images in) or, for another tool's
    file (``input_stage`` None), the shape of one step of the user's inputs."""

    layers: list[NetxLayer]
    input_stage: InputStage | None
    metadata: dict = field(default_factory=dict)
    foreign_input_shape: tuple[int, ...] = ()

    @property
    def foreign(self) -> bool:
        return self.input_stage is None

    @property
    def input_synapse(self) -> bool:
        """True when the inputs are spikes into the first layer's synapse (no input layer):
        that synapse delays them by one step, like every other."""
        return self.layers[0].kind != "input"

    @property
    def input_shape(self) -> tuple[int, ...]:
        """One sample's input: the image (our files) or one step of the user's inputs."""
        return self.input_stage.input_shape if self.input_stage is not None else self.foreign_input_shape

    @property
    def pipeline_delay_steps(self) -> int:
        """Synaptic connections from the input to the last layer: one step each."""
        return len(self.layers) - 1 + int(self.input_synapse)


def conv_output_shape(in_shape: tuple[int, ...], out_channels: int, kernel: tuple[int, int],
                      stride: tuple[int, int], padding: tuple[int, int], dilation: tuple[int, int]) -> tuple[int, ...]:
    """(C, H, W) a convolution gives for a (C_in, H, W) input (torch's arithmetic)."""
    spatial = [(size + 2 * p - d * (k - 1) - 1) // s + 1
               for size, k, s, p, d in zip(in_shape[1:], kernel, stride, padding, dilation)]
    return (int(out_channels), *spatial)


# ---- writing ----------------------------------------------------------------------------------
def _string(group: h5py.Group, name: str, value: str) -> None:
    group.create_dataset(name, (1,), STRING_DTYPE, [value.encode("ascii")])


def _write_layers(handle: h5py.File, network: NetxNetwork) -> None:
    layers = handle.create_group("layer")
    index = 0
    for layer in network.layers:
        if layer.flatten_before:
            _string(layers.create_group(str(index)), "type", "flatten")
            index += 1
        group = layers.create_group(str(index))
        _string(group, "type", layer.kind)
        group.create_dataset("shape", data=np.asarray(layer.shape, dtype=np.int64))
        neuron = group.create_group("neuron")
        _string(neuron, "type", "CUBA")
        fields = (("iDecay", layer.neuron.i_decay), ("vDecay", layer.neuron.v_decay),
                  ("vThMant", layer.neuron.v_th_mant), ("refDelay", REFRACTORY_DELAY_STEPS),
                  ("gradedSpike", GRADED_SPIKE))
        for name, value in fields:
            neuron.create_dataset(name, data=np.int64(value))
        if layer.kind == "input":
            index += 1
            continue
        group.create_dataset("weight", data=np.asarray(layer.weight, dtype=np.int64))
        group.create_dataset("bias", data=np.asarray(layer.bias, dtype=np.int64))
        if layer.kind == "conv":
            for name in ("stride", "padding", "dilation"):
                group.create_dataset(name, data=np.asarray(getattr(layer, name), dtype=np.int64))
            group.create_dataset("groups", data=np.int64(layer.groups))
        index += 1


def _write_input_stage(handle: h5py.File, stage: InputStage) -> None:
    group = handle.create_group("stars/input")
    _string(group, "kind", stage.kind)
    for name in ("weight", "bias"):
        group.create_dataset(name, data=np.asarray(getattr(stage, name), dtype=np.float64))
    for name in ("stride", "padding", "dilation", "input_shape"):
        group.create_dataset(name, data=np.asarray(getattr(stage, name), dtype=np.int64))
    group.create_dataset("groups", data=np.int64(stage.groups))
    group.create_dataset("current_scale", data=np.float64(stage.current_scale))
    group.create_dataset("current_offset", data=np.float64(stage.current_offset))


def _metadata_json(metadata: dict) -> str:
    return json.dumps({k: v for k, v in metadata.items() if k != CHECKSUM_KEY}, sort_keys=True)


def content_sha256(handle: h5py.File, metadata: dict) -> str:
    """The file's checksum as the module docstring defines it."""
    paths: list[str] = []
    handle.visititems(lambda name, obj: paths.append(name) if isinstance(obj, h5py.Dataset) else None)
    digest = hashlib.sha256()
    for path in sorted(p for p in paths if p != METADATA_PATH):
        value = np.asarray(handle[path][()])
        if value.dtype.kind == "O":
            raise NetxFormatError(f"dataset {path!r} holds Python objects, which no checksum covers")
        digest.update(path.encode() + b"\0" + value.dtype.str.encode() + str(value.shape).encode() + b"\0")
        digest.update(np.ascontiguousarray(value).tobytes())
    digest.update(_metadata_json(metadata).encode())
    return digest.hexdigest()


def _network_bytes(network: NetxNetwork, metadata: dict) -> bytes:
    buffer = io.BytesIO()
    with h5py.File(buffer, "w", track_order=False) as handle:
        _write_layers(handle, network)
        handle.create_dataset(METADATA_PATH, data=json.dumps(metadata, sort_keys=True).encode())
        _write_input_stage(handle, network.input_stage)
    return buffer.getvalue()


def network_bytes(network: NetxNetwork) -> bytes:
    """The network as netx HDF5 bytes with its checksum (deterministic: no timestamps, fixed
    key order). Written once to compute the checksum of what h5py stores, then again with it."""
    if network.input_stage is None:
        raise NetxFormatError("only networks with stars-deploy's off-chip input stage are written here")
    metadata = {**network.metadata, "format": NETX_FORMAT}
    metadata.pop(CHECKSUM_KEY, None)
    with h5py.File(io.BytesIO(_network_bytes(network, metadata)), "r") as handle:
        metadata[CHECKSUM_KEY] = content_sha256(handle, metadata)
    return _network_bytes(network, metadata)


def write_network(path: Path, network: NetxNetwork) -> None:
    """Write the .net file atomically."""
    from stars_deploy.fileio import write_bytes

    write_bytes(Path(path), network_bytes(network))


# ---- reading and validation -------------------------------------------------------------------
class _Fields:
    """Typed, range-checked reads from one file; every error names the file and the field."""

    def __init__(self, path: Path):
        self.path = path

    def fail(self, where: str, message: str) -> NetxFormatError:
        return NetxFormatError(f"{self.path}: {where}: {message}")

    def dataset(self, group: h5py.Group, name: str, where: str):
        if name not in group:
            raise self.fail(where, f"has no '{name}'")
        obj = group[name]
        if not isinstance(obj, h5py.Dataset):
            raise self.fail(where, f"'{name}' is a group where a dataset is due")
        return obj[()]

    def text(self, group: h5py.Group, name: str, where: str) -> str:
        value = self.dataset(group, name, where)
        value = np.asarray(value)
        if value.size != 1:
            raise self.fail(where, f"'{name}' holds {value.size} values where one string is due")
        value = value.reshape(-1)[0]
        if isinstance(value, (bytes, np.bytes_)):
            try:
                return bytes(value).decode("ascii")
            except UnicodeDecodeError:
                raise self.fail(where, f"'{name}' is not ASCII text ({bytes(value)[:20]!r})") from None
        if isinstance(value, str):
            return value
        raise self.fail(where, f"'{name}' is a {np.asarray(value).dtype} value where a string is due")

    def integers(self, value, where: str, name: str, low: int, high: int, meaning: str,
                 allow_integral_float: bool = True) -> np.ndarray:
        """int64 array of ``value``; integer (or bool) dtype, or float with integral finite
        values (lava-dl writes weights as float32 integers); every value in [low, high]."""
        array = np.asarray(value)
        kind = array.dtype.kind
        if kind in "iub":
            result = array.astype(np.int64)
        elif kind == "f" and allow_integral_float:
            if not np.all(np.isfinite(array)):
                raise self.fail(where, f"{name} holds NaN or Inf; a {meaning} is an integer")
            if np.any(array != np.round(array)):
                bad = array[array != np.round(array)].reshape(-1)[0]
                raise self.fail(where, f"{name} holds non-integer values (e.g. {bad:g}); a {meaning} is an "
                                       "integer, netx would truncate it: re-export with integer values")
            if array.size and (array.min() < low or array.max() > high):
                result = array  # reported below with the range
            else:
                result = array.astype(np.int64)
        else:
            raise self.fail(where, f"{name} has dtype {array.dtype}, where an integer {meaning} is due")
        if result.size and (result.min() < low or result.max() > high):
            raise self.fail(where, f"{name} ranges {result.min():g}..{result.max():g}, outside the {meaning}'s "
                                   f"range {low}..{high}: the chip cannot hold it; re-export within the range")
        return np.asarray(result, dtype=np.int64)

    def scalar(self, group: h5py.Group, name: str, where: str, low: int, high: int, meaning: str,
               default: int | None = None) -> int:
        if name not in group and default is not None:
            return default
        value = np.asarray(self.dataset(group, name, where))
        if value.size != 1:
            raise self.fail(where, f"{name} holds {value.size} values where one is due")
        return int(self.integers(value.reshape(-1), where, name, low, high, meaning)[0])

    def pair(self, group: h5py.Group, name: str, where: str, low: int, high: int, default: int) -> tuple[int, int]:
        if name not in group:
            return (default, default)
        array = self.integers(np.asarray(self.dataset(group, name, where)).reshape(-1), where, name, low, high,
                              f"conv {name}")
        if array.size not in (1, 2):
            raise self.fail(where, f"{name} holds {array.size} values where 1 or 2 are due")
        return (int(array[0]), int(array[-1]))

    def shape(self, group: h5py.Group, where: str) -> tuple[int, ...]:
        array = self.integers(np.asarray(self.dataset(group, "shape", where)).reshape(-1), where, "shape", 1,
                              MAX_LAYER_NEURONS, "layer dimension")
        if array.size not in (1, 3):
            raise self.fail(where, f"shape {array.tolist()} has {array.size} dimensions; (N,) or (C, H, W) is due")
        if int(np.prod(array)) > MAX_LAYER_NEURONS:
            raise self.fail(where, f"shape {array.tolist()} has {int(np.prod(array)):,} neurons, more than the "
                                   f"{MAX_LAYER_NEURONS:,} a layer may have here")
        return tuple(int(s) for s in array)


def _neuron(fields: _Fields, group: h5py.Group, where: str) -> NeuronConfig:
    if "neuron" not in group or not isinstance(group["neuron"], h5py.Group):
        raise fields.fail(where, "has no neuron group; netx would give it a default neuron that the chip "
                                 "does not have: add the layer's neuron")
    neuron = group["neuron"]
    kind = fields.text(neuron, "type", f"{where} neuron")
    if kind not in NEURON_TYPES:
        what = REFUSED_NEURONS.get(kind, f"neuron type {kind!r}")
        raise fields.fail(where, f"has {what}, which the emulator and the lava target do not run "
                                 f"(they run {' and '.join(NEURON_TYPES)} neurons)")
    unknown = sorted(set(neuron) - NEURON_KEYS - TRAINING_ONLY_KEYS)
    if unknown:
        raise fields.fail(where, f"{kind} neuron field(s) {', '.join(unknown)} are not emulated "
                                 f"(known: {', '.join(sorted(NEURON_KEYS))})")
    here = f"{where} neuron"
    config = NeuronConfig(fields.scalar(neuron, "iDecay", here, 0, I_DECAY_MAX, "12-bit current decay"),
                          fields.scalar(neuron, "vDecay", here, 0, V_DECAY_MAX, "12-bit voltage decay"),
                          fields.scalar(neuron, "vThMant", here, 0, THRESHOLD_MANT_MAX, "17-bit threshold mantissa"))
    ref_delay = fields.scalar(neuron, "refDelay", here, 0, 1 << 16, "refractory delay", REFRACTORY_DELAY_STEPS)
    if ref_delay != REFRACTORY_DELAY_STEPS:
        raise fields.fail(here, f"refDelay = {ref_delay}: a refractory period is not emulated (netx's LIF "
                                f"resets and runs on at once, refDelay {REFRACTORY_DELAY_STEPS})")
    graded = fields.scalar(neuron, "gradedSpike", here, 0, 1, "flag", GRADED_SPIKE)
    message_bits = fields.scalar(neuron, "messageBits", here, 0, 32, "message width", 0)
    if graded or message_bits:
        raise fields.fail(here, "graded spikes (gradedSpike / messageBits) are not emulated: Lava's LIF sends "
                                "binary spikes, so the chip would run this layer differently")
    if fields.scalar(neuron, "wgtExp", here, -8, 8, "weight exponent", 0):
        raise fields.fail(here, "wgtExp is not 0: netx ignores it but the chip would scale the weights by "
                                "2^wgtExp; fold it into the weights")
    return config


def _check_keys(fields: _Fields, group: h5py.Group, kind: str, where: str) -> None:
    if "delay" in group:
        raise fields.fail(where, "has synaptic delays ('delay'), which the emulator and the lava target do not "
                                 "run (netx ignores them on conv layers): remove them")
    unknown = sorted(set(group) - LAYER_KEYS[kind])
    if unknown:
        raise fields.fail(where, f"{kind} layer field(s) {', '.join(unknown)} are not emulated")


def _dense_layer(fields: _Fields, group: h5py.Group, where: str, in_shape: tuple[int, ...] | None,
                 flatten: bool) -> NetxLayer:
    shape = fields.shape(group, where)
    if len(shape) != 1:
        raise fields.fail(where, f"a dense layer's shape is (N,), got {list(shape)}")
    weight = fields.integers(fields.dataset(group, "weight", where), where, "weight", WEIGHT_MIN, WEIGHT_MAX,
                             "8-bit weight mantissa")
    neurons = shape[0]
    if weight.ndim == 1 and weight.size % neurons == 0:
        weight = weight.reshape(neurons, -1)  # netx reshapes 1-D weights the same way
    inputs = None if in_shape is None else int(np.prod(in_shape))
    if weight.ndim != 2 or weight.shape[0] != neurons or (inputs is not None and weight.shape[1] != inputs):
        expected = f"({neurons}, {inputs if inputs is not None else 'inputs'})"
        raise fields.fail(where, f"weight shape {list(weight.shape)} does not fit the layer: {expected} is due "
                                 f"({neurons} neurons, {inputs if inputs is not None else '?'} inputs from the "
                                 "layer before)")
    if in_shape is not None and len(in_shape) == 3 and not flatten:
        raise fields.fail(where, "a dense layer after a conv layer needs a flatten layer between them")
    for key, value in (("outFeatures", neurons), ("inFeatures", weight.shape[1])):
        if key in group and fields.scalar(group, key, where, 0, MAX_LAYER_NEURONS, "feature count") != value:
            raise fields.fail(where, f"{key} disagrees with the weight shape {list(weight.shape)}")
    return NetxLayer("dense", shape, _neuron(fields, group, where), weight, _bias(fields, group, where, neurons, "neuron"),
                     flatten_before=flatten)


def _bias(fields: _Fields, group: h5py.Group, where: str, size: int, per: str) -> np.ndarray | None:
    if "bias" not in group:
        return None
    bias = fields.integers(np.asarray(fields.dataset(group, "bias", where)), where, "bias", BIAS_MANT_MIN,
                           BIAS_MANT_MAX, "13-bit bias mantissa").reshape(-1)
    if bias.size != size:
        raise fields.fail(where, f"bias has {bias.size} values; one per {per} ({size}) is due")
    return bias


def _conv_layer(fields: _Fields, group: h5py.Group, where: str, in_shape: tuple[int, ...] | None) -> NetxLayer:
    shape = fields.shape(group, where)
    if in_shape is None or len(in_shape) != 3:
        raise fields.fail(where, "a conv layer needs a (C, H, W) layer or input layer before it"
                                 + ("" if in_shape is None else f", got {list(in_shape)}"))
    if len(shape) != 3:
        raise fields.fail(where, f"a conv layer's shape is (C, H, W), got {list(shape)}")
    weight = fields.integers(fields.dataset(group, "weight", where), where, "weight", WEIGHT_MIN, WEIGHT_MAX,
                             "8-bit weight mantissa")
    if weight.ndim == 5 and weight.shape[-1] == 1:
        weight = weight[..., 0]  # slayer's (out, in, kH, kW, kT = 1); netx drops kT the same way
    stride = fields.pair(group, "stride", where, 1, CONV_FIELD_MAX, 1)
    padding = fields.pair(group, "padding", where, 0, CONV_FIELD_MAX, 0)
    dilation = fields.pair(group, "dilation", where, 1, CONV_FIELD_MAX, 1)
    groups = fields.scalar(group, "groups", where, 1, CONV_FIELD_MAX, "conv groups", 1)
    if (weight.ndim != 4 or weight.shape[0] != shape[0] or weight.shape[1] * groups != in_shape[0]
            or shape[0] % groups or max(weight.shape[2:]) > CONV_FIELD_MAX):
        raise fields.fail(where, f"weight shape {list(weight.shape)} does not fit the layer: ({shape[0]}, "
                                 f"{in_shape[0]} / groups {groups}, kH, kW) is due for {in_shape[0]} input and "
                                 f"{shape[0]} output channels")
    out = conv_output_shape(in_shape, shape[0], tuple(weight.shape[2:]), stride, padding, dilation)
    if out != shape:
        raise fields.fail(where, f"shape {list(shape)} is not what its convolution gives: {list(out)} from the "
                                 f"{list(in_shape)} input (kernel {list(weight.shape[2:])}, stride {list(stride)}, "
                                 f"padding {list(padding)}, dilation {list(dilation)})")
    for key, value in (("outChannels", shape[0]), ("inChannels", in_shape[0])):
        if key in group and fields.scalar(group, key, where, 0, MAX_LAYER_NEURONS, "channel count") != value:
            raise fields.fail(where, f"{key} disagrees with the layers around it ({value} channels)")
    return NetxLayer("conv", shape, _neuron(fields, group, where), weight, _bias(fields, group, where, shape[0], "channel"),
                     stride=stride, padding=padding, dilation=dilation, groups=groups)


def _read_layers(fields: _Fields, handle: h5py.File, notes: list[str]) -> tuple[list[NetxLayer], tuple[int, ...] | None]:
    """The on-chip layers (flatten folded into ``flatten_before``) and, for a file whose
    first layer is synaptic, the shape of its input."""
    if "layer" not in handle or not isinstance(handle["layer"], h5py.Group):
        raise fields.fail("file", "has no 'layer' group: it is not a netx network")
    groups = handle["layer"]
    count = len(groups)
    if count == 0:
        raise fields.fail("layer", "is empty: a network needs at least one layer")
    layers: list[NetxLayer] = []
    in_shape, first_input, flatten = None, None, False
    for index in range(count):
        where = f"layer {index}"
        if str(index) not in groups or not isinstance(groups[str(index)], h5py.Group):
            raise fields.fail("layer", f"has no group '{index}' (layers are numbered 0..{count - 1})")
        group = groups[str(index)]
        kind = fields.text(group, "type", where)
        if kind not in LAYER_TYPES:
            what = REFUSED_LAYERS.get(kind, f"layer type {kind!r}")
            raise fields.fail(where, f"is one of netx's {what}, which the emulator and the lava target do not run "
                                     f"(they run {', '.join(LAYER_TYPES)})" if kind in REFUSED_LAYERS else
                              f"has {what}; supported: {', '.join(LAYER_TYPES)}")
        _check_keys(fields, group, kind, where)
        if kind == "flatten":
            if flatten or in_shape is None:
                raise fields.fail(where, "a flatten layer must follow a layer and precede a dense one")
            flatten = True
            continue
        if kind == "input":
            if index != 0:
                raise fields.fail(where, "an input layer is only allowed first")
            shape = fields.shape(group, where)
            if "neuron" not in group:  # a shape only: netx takes it as the input shape
                in_shape = first_input = shape
                continue
            layer = NetxLayer("input", shape, _neuron(fields, group, where))
            first_input = shape
            ignored = [key for key in ("weight", "bias") if key in group]
            if ignored:
                notes.append(f"layer 0 (input): netx ignores its {' and '.join(ignored)} (slayer's input transform); "
                             "the inputs given are the input layer's synaptic input as they are")
        elif kind == "dense":
            layer = _dense_layer(fields, group, where, in_shape, flatten)
            if not layers and first_input is None:
                first_input = (int(layer.weight.shape[1]),)
        else:
            if flatten:
                raise fields.fail(where, "a flatten layer before a conv layer is not supported")
            layer = _conv_layer(fields, group, where, in_shape)
            if not layers and first_input is None:
                first_input = in_shape
        layer.flatten_before, flatten = flatten, False
        layers.append(layer)
        in_shape = layer.shape
    if flatten:
        raise fields.fail(f"layer {count - 1}", "the network ends with a flatten layer")
    if not layers:
        raise fields.fail("layer", "holds no layer with neurons")
    return layers, first_input


def _check_metadata(fields: _Fields, metadata, layers: list[NetxLayer]) -> dict:
    """Our metadata's keys, types and ranges (missing optional keys are fine)."""
    where = "stars/metadata"
    if not isinstance(metadata, dict):
        raise fields.fail(where, "is not a JSON object")
    entries = metadata.get("layers")
    if not isinstance(entries, list) or len(entries) != len(layers):
        raise fields.fail(where, f"'layers' must list one entry per layer ({len(layers)}), got "
                                 f"{len(entries) if isinstance(entries, list) else type(entries).__name__}: re-export")
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("spiking"), bool):
            raise fields.fail(where, f"layers[{index}] needs a boolean 'spiking'")
        exponent = entry.get("exponent", 0)
        if isinstance(exponent, bool) or not isinstance(exponent, int) or abs(exponent) > MAX_EXPONENT:
            raise fields.fail(where, f"layers[{index}].exponent = {exponent!r}: an integer within "
                                     f"+-{MAX_EXPONENT} is due")
        if entry["spiking"] and not isinstance(entry.get("spike_name"), str):
            raise fields.fail(where, f"layers[{index}] spikes but has no spike_name")
    if not all(entry["spiking"] for entry in entries[:-1]):
        raise fields.fail(where, "only the last layer may be a non-spiking readout")
    timesteps = metadata.get("timesteps")
    if timesteps is not None and (isinstance(timesteps, bool) or not isinstance(timesteps, int) or timesteps < 1):
        raise fields.fail(where, f"timesteps = {timesteps!r}: a positive integer is due")
    readout = metadata.get("readout", "spikes" if entries[-1]["spiking"] else "current")
    if readout != ("spikes" if entries[-1]["spiking"] else "current"):
        raise fields.fail(where, f"readout {readout!r} does not match the last layer "
                                 f"({'spiking' if entries[-1]['spiking'] else 'non-spiking'})")
    dt_s = metadata.get("dt_s")
    if dt_s is not None and (isinstance(dt_s, bool) or not isinstance(dt_s, (int, float)) or
                             not math.isfinite(dt_s) or dt_s <= 0):
        raise fields.fail(where, f"dt_s = {dt_s!r}: a positive number of seconds is due")
    delay = metadata.get("pipeline_delay_steps")
    if delay is not None and delay != len(layers) - 1:
        raise fields.fail(where, f"pipeline_delay_steps = {delay!r}, but {len(layers)} layers delay "
                                 f"{len(layers) - 1} steps")
    return metadata


def _floats(fields: _Fields, group: h5py.Group, name: str, where: str) -> np.ndarray:
    array = np.asarray(fields.dataset(group, name, where))
    if array.dtype.kind not in "fiu" or not np.all(np.isfinite(array)):
        raise fields.fail(where, f"{name} must be finite numbers (dtype {array.dtype})")
    return array.astype(np.float64)


def _input_stage(fields: _Fields, handle: h5py.File, first: NetxLayer) -> InputStage:
    where = "stars/input"
    if "stars/input" not in handle or not isinstance(handle["stars/input"], h5py.Group):
        raise fields.fail(where, "is missing: re-export the file")
    group = handle["stars/input"]
    kind = fields.text(group, "kind", where)
    weight, bias = _floats(fields, group, "weight", where), _floats(fields, group, "bias", where)
    scale, offset = (float(_floats(fields, group, name, where).reshape(-1)[0])
                     for name in ("current_scale", "current_offset"))
    input_shape = tuple(int(s) for s in fields.integers(np.asarray(fields.dataset(group, "input_shape", where))
                                                        .reshape(-1), where, "input_shape", 1, MAX_LAYER_NEURONS,
                                                        "input dimension"))
    stride, padding, dilation = (fields.pair(group, name, where, low, CONV_FIELD_MAX, low)
                                 for name, low in (("stride", 1), ("padding", 0), ("dilation", 1)))
    groups = fields.scalar(group, "groups", where, 1, CONV_FIELD_MAX, "conv groups", 1)
    if kind == "conv":
        ok = (weight.ndim == 4 and len(input_shape) == 3 and weight.shape[1] * groups == input_shape[0]
              and bias.shape == (weight.shape[0],)
              and conv_output_shape(input_shape, weight.shape[0], weight.shape[2:], stride, padding,
                                    dilation) == first.shape)
    elif kind == "dense":
        ok = (weight.ndim == 2 and weight.shape == (int(np.prod(first.shape)), int(np.prod(input_shape)))
              and bias.shape == (weight.shape[0],))
    else:
        raise fields.fail(where, f"kind {kind!r}: 'conv' or 'dense' is due")
    if not ok:
        raise fields.fail(where, f"the {kind} input stage (weight {list(weight.shape)}, bias {list(bias.shape)}, "
                                 f"input {list(input_shape)}) does not give the input layer's shape {list(first.shape)}")
    return InputStage(kind, weight, bias, scale, offset, input_shape, stride, padding, dilation, groups)


def _foreign_metadata(fields: _Fields, handle: h5py.File, layers: list[NetxLayer], notes: list[str]) -> dict:
    timesteps = None
    if "simulation" in handle and isinstance(handle["simulation"], h5py.Group) and "tSample" in handle["simulation"]:
        timesteps = fields.scalar(handle["simulation"], "tSample", "simulation", 1, 1 << 20, "steps per sample")
    return {"format": FOREIGN_FORMAT, "timesteps": timesteps, "readout": "spikes", "notes": notes,
            "layers": [{"spike_name": f"layer{index}", "exponent": 0, "spiking": True} for index in range(len(layers))]}


def read_network(path: Path) -> NetxNetwork:
    """Read and validate a .net file: ours (with its off-chip input stage, checksum verified)
    or another tool's netx file (validated, not checksummed)."""
    path = Path(path)
    if path.is_dir():
        raise NetxFormatError(f"{path} is a directory: give the .net file itself")
    if not path.is_file():
        raise NetxFormatError(f"netx file {path} does not exist: run `stars-deploy export --target loihi` first")
    fields = _Fields(path)
    try:
        with h5py.File(path, "r") as handle:
            ours = "stars" in handle
            notes: list[str] = []
            try:
                layers, first_input = _read_layers(fields, handle, notes)
            except NetxFormatError as exc:
                if ours:
                    raise
                raise NetxFormatError(f"{path} has no 'stars' group, so it is read as another tool's netx file, "
                                      f"and {str(exc).removeprefix(f'{path}: ')}") from None
            if not ours:
                return NetxNetwork(layers, None, _foreign_metadata(fields, handle, layers, notes), first_input)
            if layers[0].kind != "input":
                raise fields.fail("layer 0", "the first layer of a stars-deploy file must be the input layer")
            raw = np.asarray(fields.dataset(handle["stars"], "metadata", "stars"))
            if raw.dtype.kind not in "SO" or raw.size != 1:
                raise fields.fail(METADATA_PATH, f"is a {raw.dtype} array where one JSON string is due: re-export")
            try:
                metadata = json.loads(bytes(raw.reshape(-1)[0]).decode())
            except (UnicodeDecodeError, json.JSONDecodeError, TypeError, ValueError) as exc:
                raise fields.fail(METADATA_PATH, f"is not valid JSON ({type(exc).__name__}): re-export the file") from None
            if not isinstance(metadata, dict):
                raise fields.fail(METADATA_PATH, "is not a JSON object: re-export the file")
            if metadata.get("format") == NETX_FORMAT:
                stored = metadata.get(CHECKSUM_KEY)
                if not isinstance(stored, str) or stored != content_sha256(handle, metadata):
                    raise fields.fail("checksum", "the file's content does not match its sha256 (corrupted or "
                                                  "edited after export): re-export it")
            elif metadata.get("format") not in UNCHECKSUMMED_FORMATS:
                raise fields.fail(METADATA_PATH, f"format {metadata.get('format')!r}, expected {NETX_FORMAT}")
            metadata = _check_metadata(fields, metadata, layers)
            stage = _input_stage(fields, handle, layers[0])
    except NetxFormatError:
        raise
    except Exception as exc:  # h5py's OSError/KeyError/ValueError/RuntimeError on truncated or corrupt files
        raise NetxFormatError(f"cannot read {path} as a netx file ({type(exc).__name__}: {exc}): the file is "
                              "truncated or corrupt; re-export or re-download it") from None
    return NetxNetwork(layers, stage, metadata)
