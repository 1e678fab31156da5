r"""Student -> NIR graph, built node by node with nir's own classes, and ``export --target nir``.

Every conv->BatchNorm pair is folded (its family's ``fold``) so the graph holds exactly the
float32 weights of the folded student; the family's ``describe`` walks the student through
:class:`NIRBuilder`. Neurons become ``nir.LIF`` (current-free student) or ``nir.CubaLIF``
(student with a synaptic current) with

.. math::
    \tau_{mem} = \text{tau\_mem\_steps} \cdot dt, \quad \tau_{syn} = \text{tau\_syn\_steps} \cdot dt,
    \quad r = 1, \quad w_{in} = \tau_{syn} / dt

in seconds, so that NIR's ``tau dv/dt = (v_leak - v) + r I`` integrated by explicit Euler at
``dt`` is Norse's update (``v += dt/tau (v_leak - v + I)``), and NIR's CubaLIF current
``tau_syn dI/dt = -I + w_in x`` by Euler, ``I += dt/tau_syn (w_in x - I)``, is Norse
LIFCell's ``i += x`` followed by its decay (``w_in dt / tau_syn = 1``). The readout is an ``Affine`` node
whose output is averaged over the T steps (metadata ``readout = "mean"``). Node names follow
the student's module names (``layers.0.conv``, ``layers.0.lif``, ``blocks.1.shortcut``...);
``spike_layers`` in the metadata maps each neuron node to the student's spike name.
"""

from __future__ import annotations

from pathlib import Path

import nir
import numpy as np
import torch
from torch import nn

from stars_deploy import vocabulary
from stars_deploy.distillation.config import read_run_config
from stars_deploy.errors import ConfigError
from stars_deploy.layout import STUDENT, export_dir
from stars_deploy.students import LIFConfig, fold_student, load_student, student_family

from .layers import LayerTable
from .nir_format import NIR_FORMAT, encode_metadata, graph_layer_table, write_nir
from .records import file_entries, merge_record
from .registry import ExportOptions, export_kind


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
    # NIR's CubaLIF scales its input by dt/tau_syn; w_in = tau_syn/dt undoes it (Norse adds x whole)
    return nir.CubaLIF(tau_mem=_full(shape, lif.tau_mem_s, np.float64),
                       tau_syn=_full(shape, lif.tau_syn_s, np.float64),
                       w_in=_full(shape, lif.tau_syn_s / lif.dt_s), **common)


class NIRBuilder(LayerTable):
    """The layer table plus one nir node per row (``students.GraphBuilder``)."""

    def __init__(self, input_shape: tuple[int, ...]):
        self.nodes: dict[str, nir.NIRNode] = {"input": nir.Input(input_type={"input": np.array(input_shape)})}
        super().__init__(input_shape)

    def conv(self, name: str, conv: nn.Conv2d, source: str) -> str:
        name = super().conv(name, conv, source)
        self.nodes[name] = nir.Conv2d(input_shape=self.shapes[source][1:], weight=_numpy(conv.weight),
                                      stride=conv.stride, padding=conv.padding, dilation=conv.dilation,
                                      groups=conv.groups, bias=_numpy(conv.bias))
        return name

    def neuron(self, name: str, lif: LIFConfig, sources: list[str]) -> str:
        name = super().neuron(name, lif, sources)
        self.nodes[name] = neuron_node(lif, self.shapes[name])
        return name

    def flatten(self, name: str, source: str) -> str:
        name = super().flatten(name, source)
        shape = self.shapes[source]
        # start_dim counted from the end (-3 for (C, H, W)): the same flattening in NIR's
        # batch-free shapes, and the batch-keeping one for readers that hand start_dim to
        # torch.nn.Flatten on (B, C, H, W) as it stands (Norse, snnTorch, nirtorch's default)
        self.nodes[name] = nir.Flatten(input_type={"input": np.array(shape)}, start_dim=-len(shape), end_dim=-1)
        return name

    def affine(self, name: str, linear: nn.Linear, source: str) -> str:
        name = super().affine(name, linear, source)
        self.nodes[name] = nir.Affine(weight=_numpy(linear.weight), bias=_numpy(linear.bias))
        return name

    def global_avg_pool(self, name: str, source: str) -> str:
        name = super().global_avg_pool(name, source)
        channels, height, width = self.shapes[source]
        node = nir.AvgPool2d(kernel_size=np.array([height, width]), stride=np.array([height, width]),
                             padding=np.array([0, 0]))
        # NIR leaves pooling types undefined; give them in full (the graph has no None shape)
        node.input_type = {"input": np.array([channels, height, width])}
        node.output_type = {"output": np.array([channels, 1, 1])}
        self.nodes[name] = node
        return name

    def output(self, source: str, classes: int) -> str:
        name = super().output(source, classes)
        self.nodes[name] = nir.Output(output_type={"output": np.array([classes])})
        return name


def describe_student(student: nn.Module, builder: LayerTable) -> LayerTable:
    """Walk the folded ``student`` through ``builder`` as its family describes it."""
    config = student.config
    last, spike_layers = student_family(config.family).describe(builder, fold_student(student), config.lif)
    builder.output(last, config.num_classes)
    builder.spike_layers = spike_layers
    return builder


def student_to_nir(student: nn.Module, class_names: list[str] | None = None,
                   normalization: tuple[list[float], list[float]] | None = None) -> nir.NIRGraph:
    """The NIR graph of ``student`` with BatchNorm folded and full shapes on every node.

    ``normalization`` is (mean, std) per channel of the images in [0, 1]; the Input node takes
    the normalised image at every step (direct encoding). The student is not modified."""
    config = student.config
    builder = describe_student(student, NIRBuilder(config.input_shape))
    channels = config.input_shape[0]
    mean, std = normalization or ([0.0] * channels, [1.0] * channels)
    names = list(class_names) if class_names else [str(i) for i in range(config.num_classes)]
    if len(names) != config.num_classes:
        raise ConfigError(f"NIR export: {len(names)} class names for {config.num_classes} classes")
    metadata = {
        "format": NIR_FORMAT, vocabulary.DT_KEY: float(config.lif.dt_s), "integrator": vocabulary.INTEGRATOR,
        "reset": vocabulary.RESET, "state_init": vocabulary.STATE_INIT, "timesteps": int(config.timesteps),
        "encoding": vocabulary.ENCODING, "readout": vocabulary.READOUT, "student_family": config.family,
        "normalization": {"mean": [float(m) for m in mean], "std": [float(s) for s in std]},
        "class_names": names, "spike_layers": builder.spike_layers,
    }
    return nir.NIRGraph(nodes=builder.nodes, edges=builder.edges, metadata=encode_metadata(metadata),
                        type_check=True)


def student_record(run_dir: Path, student: nn.Module, target: str, files: list[Path], rows: list[dict]) -> dict:
    """The export.json payload of a student export (shared by the student-file exports)."""
    config = student.config
    return {"target": target, "run_dir": str(run_dir), "files": file_entries(files),
            "input_shape": list(config.input_shape), "output_shape": [config.num_classes],
            "timesteps": config.timesteps, "dt_s": config.lif.dt_s,
            "parameters": sum(row["parameters"] for row in rows),
            "student_parameters": sum(p.numel() for p in student.parameters()), "layers": rows}


def export_nir(run_dir: Path, options: ExportOptions = ExportOptions()) -> dict:
    """``export --target nir``: RUN_DIR/export/student.nir and its export.json record (a
    converted teacher's run: its network rebuilt from convert.json, stars_deploy/converter.py)."""
    from stars_deploy.runs import is_converted

    from .converted_nir import export_converted

    if is_converted(run_dir):
        return export_converted(run_dir, export_dir(run_dir) / export_kind("nir").file)
    spec = read_run_config(run_dir).teacher
    student = load_student(Path(run_dir) / STUDENT)
    mean, std = spec.mean_std
    graph = student_to_nir(student, class_names=list(spec.classes), normalization=(list(mean), list(std)))
    path = export_dir(run_dir) / export_kind("nir").file
    write_nir(path, graph)
    return merge_record(path.parent, student_record(run_dir, student, "nir", [path], graph_layer_table(graph)))
