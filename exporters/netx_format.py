r"""The stars-deploy ``.net`` file: a lava-dl netx HDF5 network plus what netx leaves open.

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
      metadata        JSON string: format, dt_s, timesteps, class_names, normalization,
                      readout ("current": logits from the last layer's u, "spikes"),
                      pipeline_delay_steps, layers [{spike_name, exponent, spiking}], report
      input/          the off-chip first synaptic layer (direct encoding), float64:
                      kind ("conv" | "dense"), weight, bias, stride, padding, dilation, groups,
                      current_scale, current_offset (bias mantissa = round(scale*c + offset))

Loihi neuron fields (netx semantics, the bit-accurate model adds du's 1 back):
``du = iDecay - 1``, ``dv = vDecay``, threshold ``vThMant << 6``, bias ``bias << 6``.

Direct encoding: the first synaptic layer runs off-chip, once per sample, in float64 on the
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

import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from stars_deploy.errors import StarsDeployError
from stars_deploy.hardware.loihi import GRADED_SPIKE, REFRACTORY_DELAY_STEPS

NETX_FORMAT = "stars-deploy/netx-v1"
STRING_DTYPE = "S10"


class NetxFormatError(StarsDeployError):
    """A .net file that cannot be read, or was not written by stars-deploy's Loihi exporter."""


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
    layers: list[NetxLayer]
    input_stage: InputStage
    metadata: dict = field(default_factory=dict)

    @property
    def pipeline_delay_steps(self) -> int:
        """Synaptic connections from the input layer to the last layer: one step each."""
        return len(self.layers) - 1


def _string(group: h5py.Group, name: str, value: str) -> None:
    group.create_dataset(name, (1,), STRING_DTYPE, [value.encode("ascii")])


def network_bytes(network: NetxNetwork) -> bytes:
    """The network as netx HDF5 bytes (deterministic: no timestamps, fixed key order)."""
    buffer = io.BytesIO()
    with h5py.File(buffer, "w", track_order=False) as handle:
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
        stars = handle.create_group("stars")
        stars.create_dataset("metadata", data=json.dumps(network.metadata, sort_keys=True).encode())
        stage = network.input_stage
        group = stars.create_group("input")
        _string(group, "kind", stage.kind)
        for name in ("weight", "bias"):
            group.create_dataset(name, data=np.asarray(getattr(stage, name), dtype=np.float64))
        for name in ("stride", "padding", "dilation", "input_shape"):
            group.create_dataset(name, data=np.asarray(getattr(stage, name), dtype=np.int64))
        group.create_dataset("groups", data=np.int64(stage.groups))
        group.create_dataset("current_scale", data=np.float64(stage.current_scale))
        group.create_dataset("current_offset", data=np.float64(stage.current_offset))
    return buffer.getvalue()


def write_network(path: Path, network: NetxNetwork) -> None:
    """Write the .net file atomically."""
    from stars_deploy.fileio import write_bytes

    write_bytes(Path(path), network_bytes(network))


def _text(dataset) -> str:
    value = dataset[()]
    value = value[0] if np.ndim(value) else value
    return value.decode("ascii") if isinstance(value, bytes) else str(value)


def _pair(value) -> tuple[int, int]:
    array = np.atleast_1d(np.asarray(value, dtype=np.int64))
    return (int(array[0]), int(array[-1]))


def read_network(path: Path) -> NetxNetwork:
    """Read a .net file written by :func:`write_network` (integers as netx reads them)."""
    path = Path(path)
    if not path.is_file():
        raise NetxFormatError(f"netx file {path} does not exist: run `stars-deploy export --target loihi` first")
    try:
        with h5py.File(path, "r") as handle:
            if "stars" not in handle:
                raise NetxFormatError(f"{path} has no 'stars' group: it was not written by stars-deploy's "
                                      "Loihi exporter (the emulator needs its off-chip input stage)")
            metadata = json.loads(handle["stars/metadata"][()].decode())
            if metadata.get("format") != NETX_FORMAT:
                raise NetxFormatError(f"{path}: format {metadata.get('format')!r}, expected {NETX_FORMAT}")
            layers, flatten_next = [], False
            for index in range(len(handle["layer"])):
                group = handle[f"layer/{index}"]
                kind = _text(group["type"])
                if kind == "flatten":
                    flatten_next = True
                    continue
                if kind not in ("input", "conv", "dense"):
                    raise NetxFormatError(f"{path}: layer {index} has type {kind!r}; only input, conv, "
                                          "dense and flatten are supported")
                neuron = group["neuron"]
                if _text(neuron["type"]) not in ("CUBA", "LOIHI") or "delay" in group:
                    raise NetxFormatError(f"{path}: layer {index} has a {_text(neuron['type'])} neuron"
                                          f"{' and synaptic delays' if 'delay' in group else ''}; the emulator "
                                          "runs CUBA neurons without extra delays only")
                layer = NetxLayer(kind, tuple(int(s) for s in group["shape"][()]),
                                  NeuronConfig(int(neuron["iDecay"][()]), int(neuron["vDecay"][()]),
                                               int(neuron["vThMant"][()])), flatten_before=flatten_next)
                flatten_next = False
                if kind != "input":
                    # netx reads weight and bias with .astype(int)
                    layer.weight = group["weight"][()].astype(np.int64)
                    layer.bias = group["bias"][()].astype(np.int64) if "bias" in group else None
                if kind == "conv":
                    layer.stride, layer.padding, layer.dilation = (_pair(group[name][()]) for name in
                                                                   ("stride", "padding", "dilation"))
                    layer.groups = int(group["groups"][()])
                layers.append(layer)
            group = handle["stars/input"]
            stage = InputStage(_text(group["kind"]), group["weight"][()], group["bias"][()],
                               float(group["current_scale"][()]), float(group["current_offset"][()]),
                               tuple(int(s) for s in group["input_shape"][()]),
                               _pair(group["stride"][()]), _pair(group["padding"][()]),
                               _pair(group["dilation"][()]), int(group["groups"][()]))
    except NetxFormatError:
        raise
    except (OSError, KeyError, ValueError) as exc:
        raise NetxFormatError(f"cannot read {path} as a stars-deploy netx file: {type(exc).__name__}: {exc}") from None
    if not layers or layers[0].kind != "input":
        raise NetxFormatError(f"{path}: the first layer must be the input layer")
    return NetxNetwork(layers, stage, metadata)
