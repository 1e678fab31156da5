r"""Student -> NIR graph, built node by node with nir's own classes.

Every conv->BatchNorm pair is folded (stars_deploy.folding) so the graph holds exactly the
float32 weights of the folded student. Neurons become ``nir.LIF`` (current-free student) or
``nir.CubaLIF`` (student with a synaptic current) with

.. math::
    \tau_{mem} = \text{tau\_mem\_steps} \cdot dt, \quad \tau_{syn} = \text{tau\_syn\_steps} \cdot dt,
    \quad r = 1, \quad w_{in} = 1

in seconds, so that NIR's ``tau dv/dt = (v_leak - v) + r I`` integrated by explicit Euler at
``dt`` is Norse's update (``v += dt/tau (v_leak - v + I)``). The readout is an ``Affine`` node
whose output is averaged over the T steps (metadata ``readout = "mean"``). Node names follow
the student's module names (``layers.0.conv``, ``layers.0.lif``, ``blocks.1.shortcut``...);
``spike_layers`` in the metadata maps each neuron node to the student's spike name.
"""

from __future__ import annotations

import nir
import numpy as np
import torch
from torch import nn

from stars_deploy.errors import ConfigError
from stars_deploy.folding import fold_student
from stars_deploy.neurons import LIFConfig

from .nir_format import (ENCODING, INTEGRATOR, NIR_FORMAT, READOUT, RESET_MODE, STATE_INIT,
                         encode_metadata)


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().cpu().numpy().astype(np.float32, copy=True)


def _full(shape, value: float, dtype=np.float32) -> np.ndarray:
    return np.full(tuple(int(s) for s in shape), value, dtype=dtype)


def neuron_node(lif: LIFConfig, shape) -> nir.NIRNode:
    """LIF or CubaLIF over ``shape`` (no batch dimension) reproducing ``lif`` at its dt.

    Time constants are float64 seconds, the rest float32 like Norse's parameters."""
    common = dict(r=_full(shape, 1.0), v_leak=_full(shape, lif.v_leak),
                  v_threshold=_full(shape, lif.v_threshold), v_reset=_full(shape, lif.v_reset))
    if lif.tau_syn_s is None:
        return nir.LIF(tau=_full(shape, lif.tau_mem_s, np.float64), **common)
    return nir.CubaLIF(tau_mem=_full(shape, lif.tau_mem_s, np.float64),
                       tau_syn=_full(shape, lif.tau_syn_s, np.float64), w_in=_full(shape, 1.0), **common)


class _GraphBuilder:
    """Collects nodes and edges while tracking each node's output shape (no batch)."""

    def __init__(self):
        self.nodes: dict[str, nir.NIRNode] = {}
        self.edges: list[tuple[str, str]] = []
        self.shapes: dict[str, tuple[int, ...]] = {}

    def add(self, name: str, node: nir.NIRNode, shape, sources: list[str]) -> str:
        if name in self.nodes:
            raise ConfigError(f"NIR export: node name {name!r} used twice")
        self.nodes[name] = node
        self.shapes[name] = tuple(int(s) for s in shape)
        self.edges.extend((source, name) for source in sources)
        return name

    def conv(self, name: str, conv: nn.Conv2d, source: str) -> str:
        if not isinstance(conv, nn.Conv2d) or conv.bias is None:
            raise ConfigError(f"NIR export: {name} must be a folded Conv2d with a bias")
        in_shape = self.shapes[source]
        node = nir.Conv2d(input_shape=in_shape[1:], weight=_numpy(conv.weight), stride=conv.stride,
                          padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
                          bias=_numpy(conv.bias))
        return self.add(name, node, node.output_type["output"], [source])

    def neuron(self, name: str, lif: LIFConfig, sources: list[str]) -> str:
        shape = self.shapes[sources[0]]
        return self.add(name, neuron_node(lif, shape), shape, sources)

    def flatten(self, name: str, source: str) -> str:
        shape = self.shapes[source]
        # start_dim counted from the end (-3 for (C, H, W)): the same flattening in NIR's
        # batch-free shapes, and the batch-keeping one for readers that hand start_dim to
        # torch.nn.Flatten on (B, C, H, W) as it stands (Norse, snnTorch, nirtorch's default)
        node = nir.Flatten(input_type={"input": np.array(shape)}, start_dim=-len(shape), end_dim=-1)
        return self.add(name, node, (int(np.prod(shape)),), [source])

    def affine(self, name: str, linear: nn.Linear, source: str) -> str:
        node = nir.Affine(weight=_numpy(linear.weight), bias=_numpy(linear.bias))
        return self.add(name, node, (linear.out_features,), [source])

    def global_avg_pool(self, name: str, source: str) -> str:
        channels, height, width = self.shapes[source]
        node = nir.AvgPool2d(kernel_size=np.array([height, width]), stride=np.array([height, width]),
                             padding=np.array([0, 0]))
        # NIR leaves pooling types undefined; give them in full (the graph has no None shape)
        node.input_type = {"input": np.array([channels, height, width])}
        node.output_type = {"output": np.array([channels, 1, 1])}
        return self.add(name, node, (channels, 1, 1), [source])


def _convnet(builder: _GraphBuilder, student: nn.Module, lif: LIFConfig) -> tuple[str, dict]:
    source, spike_layers = "input", {}
    for index, layer in enumerate(student.layers):
        source = builder.conv(f"layers.{index}.conv", layer.conv, source)
        source = builder.neuron(f"layers.{index}.lif", lif, [source])
        spike_layers[source] = f"layers.{index}"
    source = builder.flatten("flatten", source)
    return builder.affine("readout", student.readout, source), spike_layers


def _resnet(builder: _GraphBuilder, student: nn.Module, lif: LIFConfig) -> tuple[str, dict]:
    source = builder.conv("stem.conv", student.stem.conv, "input")
    source = builder.neuron("stem.lif", lif, [source])
    spike_layers = {source: "stem"}
    for index, block in enumerate(student.blocks):
        name = f"blocks.{index}"
        hidden = builder.conv(f"{name}.first.conv", block.first.conv, source)
        hidden = builder.neuron(f"{name}.first.lif", lif, [hidden])
        spike_layers[hidden] = f"{name}.first"
        main = builder.conv(f"{name}.conv2", block.conv2, hidden)
        shortcut = source
        if isinstance(block.shortcut, nn.Sequential):
            shortcut = builder.conv(f"{name}.shortcut", block.shortcut[0], source)
        source = builder.neuron(f"{name}.lif", lif, [main, shortcut])
        spike_layers[source] = f"{name}.out"
    source = builder.global_avg_pool("pool", source)
    source = builder.flatten("flatten", source)
    return builder.affine("readout", student.readout, source), spike_layers


FAMILY_BUILDERS = {"convnet": _convnet, "resnet": _resnet}


def student_to_nir(student: nn.Module, class_names: list[str] | None = None,
                   normalization: tuple[list[float], list[float]] | None = None) -> nir.NIRGraph:
    """The NIR graph of ``student`` with BatchNorm folded and full shapes on every node.

    ``normalization`` is (mean, std) per channel of the images in [0, 1]; the Input node takes
    the normalised image at every step (direct encoding). The student is not modified."""
    config = student.config
    if config.family not in FAMILY_BUILDERS:
        raise ConfigError(f"NIR export: no exporter for student family {config.family!r}")
    folded = fold_student(student)
    builder = _GraphBuilder()
    builder.add("input", nir.Input(input_type={"input": np.array(config.input_shape)}), config.input_shape, [])
    last, spike_layers = FAMILY_BUILDERS[config.family](builder, folded, config.lif)
    builder.add("output", nir.Output(output_type={"output": np.array([config.num_classes])}),
                (config.num_classes,), [last])
    channels = config.input_shape[0]
    mean, std = normalization or ([0.0] * channels, [1.0] * channels)
    names = list(class_names) if class_names else [str(i) for i in range(config.num_classes)]
    if len(names) != config.num_classes:
        raise ConfigError(f"NIR export: {len(names)} class names for {config.num_classes} classes")
    metadata = {
        "format": NIR_FORMAT, "dt_s": float(config.lif.dt_s), "integrator": INTEGRATOR,
        "reset": RESET_MODE, "state_init": STATE_INIT, "timesteps": int(config.timesteps),
        "encoding": ENCODING, "readout": READOUT, "student_family": config.family,
        "normalization": {"mean": [float(m) for m in mean], "std": [float(s) for s in std]},
        "class_names": names, "spike_layers": spike_layers,
    }
    return nir.NIRGraph(nodes=builder.nodes, edges=builder.edges, metadata=encode_metadata(metadata),
                        type_check=True)
