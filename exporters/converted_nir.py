r"""A converted teacher (stars_deploy/conversion.py) -> NIR graph, node by node from its fx graph.

NIR's ``IF`` node resets to a value, which leaves a converted ResNet at chance; reset by
subtraction is built from three nodes NIR defines, so that every reader runs the same equations.
Per converted ReLU ``site`` with threshold :math:`\lambda` and start fraction s:

    site.integrator  nir.I(r = 1/dt)                 w_t = w_{t-1} + dt r x_t  (x: the inputs' sum)
    site.spike       nir.Threshold(lambda (1 - s))   z_t = [w_t - lambda (1 - s) > 0]
    site.reset       nir.Scale(-lambda)              fed back into the integrator, one step late
    site             nir.Scale(lambda)               the site's output, lambda z_t

The reset edge closes a cycle, so it carries the previous step's value (the NIR reference's
convention, targets/nir_reference.py), giving :math:`w_t = w_{t-1} + c_t - \lambda z_{t-1}`:
reset by subtraction with :math:`v = w + s\lambda`. The integrator's inputs are summed in edge
order (the site's sources, then its reset), the order IFSite adds them in, so the torch network and
the graph make the same float32 operations: their spikes agree spike for spike (tested).

The rest of the traced graph maps one node to one NIR node: Conv2d (BatchNorm already folded by
ConvertedNetwork), Linear -> Affine, additions -> several edges into the next node (NIR sums a
node's inputs), ``x[:, :, ::s, ::s]`` and a channel ``F.pad`` (the CIFAR ResNet's option-A shortcut)
-> a 1x1 stride-s Conv2d of zeros and ones (exact), ``mean`` over H and W or global average
pooling -> AvgPool2d + Flatten, flatten (also ``x.view(x.size(0), -1)``) -> Flatten; dropout and
identities vanish. Anything else
is refused, naming the node.
"""

from __future__ import annotations

import operator
from pathlib import Path

import nir
import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from stars_deploy import vocabulary
from stars_deploy.conversion import ConvertedNetwork, IFSite
from stars_deploy.errors import CheckpointError, ConfigError
from stars_deploy.layout import CONVERT
from stars_deploy.runs import read_convert_record, sha256_file
from stars_deploy.teachers import TeacherSpec, load_teacher
from stars_deploy.teachers.training import teacher_weights
from stars_deploy.vocabulary import DT_KEY

from .nir_format import NIR_FORMAT, encode_metadata, graph_layer_table, write_nir
from .records import file_entries, merge_record

CONVERTED_FAMILY = "converted"  # metadata student_family of a converted teacher's graph
ADDS = (operator.add, torch.add)
PASS_THROUGH = (nn.Identity, nn.Dropout)
FLATTENS = (torch.flatten,)


def _array(values, dtype=np.float32) -> np.ndarray:
    return np.asarray(values, dtype=dtype)


def _full(shape, value: float) -> np.ndarray:
    return np.full(tuple(int(s) for s in shape), value, dtype=np.float32)


class _Lowering:
    """Walks the fx graph once; ``sources[node]`` is the list of NIR nodes whose sum is the
    fx node's value (several after an addition)."""

    def __init__(self, network: ConvertedNetwork, input_shape: tuple[int, ...], dt_s: float):
        self.dt_s = dt_s
        self.modules = dict(network.graph.named_modules())
        self.nodes: dict[str, nir.NIRNode] = {"input": nir.Input(input_type={"input": np.array(input_shape)})}
        self.edges: list[tuple[str, str]] = []
        self.sources: dict[fx.Node, list[str]] = {}
        self.subsampled: dict[fx.Node, tuple[fx.Node, int]] = {}  # x[:, :, ::s, ::s], lowered at its user
        self.batch_sizes: set[fx.Node] = set()  # x.size(0) or x.shape[0], as in x.view(x.size(0), -1)
        self.shapes: set[fx.Node] = set()  # x.shape
        self.spike_layers: dict[str, str] = {}
        network.set_mode("ann")
        with torch.no_grad():
            ShapeProp(network.graph).propagate(torch.zeros(1, *input_shape))

    # ---- helpers --------------------------------------------------------------------------
    def refuse(self, node: fx.Node, what: str) -> None:
        label = node.target if node.op == "call_module" else node.name
        raise ConfigError(f"convert: node {label} ({what}) has no NIR equivalent here; convert a teacher "
                          "built from Conv2d, BatchNorm, ReLU, additions, average pooling and Linear layers")

    @staticmethod
    def shape(node: fx.Node) -> tuple[int, ...]:
        return tuple(int(s) for s in node.meta["tensor_meta"].shape[1:])

    def add_node(self, name: str, node: nir.NIRNode, sources: list[str]) -> str:
        name = name if name not in self.nodes else f"{name}.{len(self.nodes)}"
        self.nodes[name] = node
        self.edges += [(source, name) for source in sources]
        return name

    def inputs(self, node: fx.Node, index: int = 0) -> list[str]:
        argument = node.args[index]
        if not isinstance(argument, fx.Node):
            self.refuse(node, f"input {index} is a constant")
        return self.value(argument)

    def value(self, argument: fx.Node) -> list[str]:
        """The NIR nodes whose sum is ``argument``'s value (a pending subsampling lowered now)."""
        if argument in self.subsampled:
            source, stride = self.subsampled[argument]
            return [self.embedding(argument.name, source, stride, 0, 0)]
        if argument not in self.sources:
            self.refuse(argument, "a value that is not computed from the input: a parameter or a constant")
        return self.sources[argument]

    def embedding(self, name: str, source: fx.Node, stride: int, before: int, after: int) -> str:
        """``source[:, :, ::stride, ::stride]`` with ``before``/``after`` zero channels: a 1x1
        stride-s conv of zeros and ones, which adds nothing but the one value it keeps."""
        channels, height, width = self.shape(source)
        weight = np.zeros((before + channels + after, channels, 1, 1), np.float32)
        weight[np.arange(channels) + before, np.arange(channels), 0, 0] = 1.0
        conv = nir.Conv2d(input_shape=(height, width), weight=weight, stride=(stride, stride), padding=(0, 0),
                          dilation=(1, 1), groups=1, bias=np.zeros(len(weight), np.float32))
        return self.add_node(f"{name}.embedding", conv, self.sources[source])

    # ---- node kinds -----------------------------------------------------------------------
    def lower(self, node: fx.Node) -> None:
        if node.op == "placeholder":
            self.sources[node] = ["input"]
        elif node.op == "call_module":
            self.module(node, self.modules[node.target])
        elif node.op == "call_function":
            self.function(node)
        elif node.op == "call_method":
            self.method(node)
        elif node.op == "output":
            argument = node.args[0]
            if not isinstance(argument, fx.Node):
                self.refuse(node, "an output that is not one tensor")
            classes = self.shape(argument)
            self.add_node("output", nir.Output(output_type={"output": np.array(classes)}), self.inputs(node))
        elif node.op != "get_attr":
            self.refuse(node, node.op)

    def module(self, node: fx.Node, module: nn.Module) -> None:
        if isinstance(module, IFSite):
            self.sources[node] = [self.site(node, module)]
        elif isinstance(module, nn.Conv2d):
            if module.padding_mode != "zeros" or isinstance(module.padding, str):
                self.refuse(node, f"Conv2d with padding {module.padding!r} ({module.padding_mode})")
            bias = module.bias if module.bias is not None else torch.zeros(module.out_channels)
            conv = nir.Conv2d(input_shape=self.shape(node.args[0])[1:], weight=_array(module.weight.detach()),
                              stride=module.stride, padding=module.padding, dilation=module.dilation,
                              groups=module.groups, bias=_array(bias.detach()))
            self.sources[node] = [self.add_node(node.target, conv, self.inputs(node))]
        elif isinstance(module, nn.Linear):
            bias = module.bias if module.bias is not None else torch.zeros(module.out_features)
            affine = nir.Affine(weight=_array(module.weight.detach()), bias=_array(bias.detach()))
            self.sources[node] = [self.add_node(node.target, affine, self.inputs(node))]
        elif isinstance(module, nn.Flatten):
            self.sources[node] = [self.flatten(node, module.start_dim, module.end_dim)]
        elif isinstance(module, (nn.AdaptiveAvgPool2d, nn.AvgPool2d)):
            self.sources[node] = [self.pool(node, module)]
        elif isinstance(module, PASS_THROUGH):
            self.sources[node] = self.inputs(node)
        else:
            what = type(module).__name__
            if isinstance(module, nn.BatchNorm2d):
                what += " not directly after a Conv2d"
            elif isinstance(module, nn.MaxPool2d):
                what += ": max over spikes is not max over rates"
            self.refuse(node, what)

    def function(self, node: fx.Node) -> None:
        if node.target in ADDS and len(node.args) == 2 and not node.kwargs:
            self.sources[node] = self.sum(node)
        elif node.target is getattr and node.args[1:] == ("shape",):
            self.shapes.add(node)
        elif node.target is operator.getitem and node.args[0] in self.shapes:
            if node.args[1] != 0:
                self.refuse(node, f"shape[{node.args[1]!r}]: only the batch size, shape[0], lowers")
            self.batch_sizes.add(node)
        elif node.target is operator.getitem:
            self.subsample(node)
        elif node.target is F.pad:
            self.pad(node)
        elif node.target in FLATTENS:
            start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
            end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
            self.sources[node] = [self.flatten(node, start, end)]
        else:
            self.refuse(node, f"function {getattr(node.target, '__name__', node.target)}")

    def method(self, node: fx.Node) -> None:
        if node.target == "mean":
            dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
            rank = len(self.shape(node.args[0])) + 1
            dims = sorted(d % rank for d in (dims if isinstance(dims, (tuple, list)) else (dims,)))
            if dims != [2, 3] or node.kwargs.get("keepdim", False) or len(node.args) > 2:
                self.refuse(node, f"mean over dimensions {dims}")
            pooled = self.global_pool(node.name, node.args[0])
            flat = nir.Flatten(input_type={"input": np.array((self.shape(node.args[0])[0], 1, 1))}, start_dim=-3,
                               end_dim=-1)
            self.sources[node] = [self.add_node(f"{node.name}.flatten", flat, [pooled])]
        elif node.target == "flatten":
            self.sources[node] = [self.flatten(node, *(list(node.args[1:]) + [0, -1][len(node.args) - 1:]))]
        elif node.target == "size" and node.args[1:] in ((0,), ()) and not node.kwargs:
            if not node.args[1:]:
                self.refuse(node, "the whole size of a tensor")
            self.batch_sizes.add(node)
        elif node.target in ("view", "reshape") and len(node.args) == 3 and node.args[2] == -1 \
                and node.args[1] in self.batch_sizes:
            self.sources[node] = [self.flatten(node, 1, -1)]
        elif node.target == "add" and len(node.args) == 2 and not node.kwargs:
            self.sources[node] = self.sum(node)
        else:
            self.refuse(node, f"method {node.target}")

    def sum(self, node: fx.Node) -> list[str]:
        first, second = self.inputs(node, 0), self.inputs(node, 1)
        if set(first) & set(second):
            self.refuse(node, "an addition of a value to itself")
        return first + second

    def subsample(self, node: fx.Node) -> None:
        index = node.args[1]
        full = slice(None)
        if not (isinstance(index, tuple) and len(index) == 4 and index[0] == full and index[1] == full
                and all(isinstance(s, slice) and s.start is None and s.stop is None for s in index[2:])
                and index[2].step == index[3].step and (index[2].step or 1) >= 1):
            self.refuse(node, f"indexing {index!r}")
        if node.args[0] in self.subsampled or not isinstance(node.args[0], fx.Node):
            self.refuse(node, "indexing of an indexed tensor")
        self.subsampled[node] = (node.args[0], index[2].step or 1)

    def pad(self, node: fx.Node) -> None:
        widths = node.args[1] if len(node.args) > 1 else node.kwargs.get("pad")
        mode = node.args[2] if len(node.args) > 2 else node.kwargs.get("mode", "constant")
        value = node.args[3] if len(node.args) > 3 else node.kwargs.get("value", None)
        if mode != "constant" or value not in (None, 0, 0.0) or len(widths) != 6 or any(widths[:4]):
            self.refuse(node, f"padding {widths!r} ({mode}): only zero channel padding lowers")
        argument = node.args[0]
        source, stride = self.subsampled.get(argument, (argument, 1))
        self.sources[node] = [self.embedding(node.name, source, stride, widths[4], widths[5])]

    def flatten(self, node: fx.Node, start: int, end: int) -> str:
        shape = self.shape(node.args[0])
        rank = len(shape) + 1
        if start % rank != 1 or end % rank != rank - 1:
            self.refuse(node, f"flatten from dimension {start} to {end} (only all but the batch)")
        flat = nir.Flatten(input_type={"input": np.array(shape)}, start_dim=-len(shape), end_dim=-1)
        return self.add_node(node.name, flat, self.inputs(node))

    def pool(self, node: fx.Node, module: nn.Module) -> str:
        if isinstance(module, nn.AdaptiveAvgPool2d):
            size = module.output_size if isinstance(module.output_size, tuple) else (module.output_size,) * 2
            if tuple(size) != (1, 1):
                self.refuse(node, f"adaptive average pooling to {size}")
            return self.global_pool(node.target, node.args[0])
        channels, height, width = self.shape(node.args[0])
        pair = nn.modules.utils._pair  # NIR's pooling fields are (height, width)
        pool = nir.AvgPool2d(kernel_size=np.array(pair(module.kernel_size)),
                             stride=np.array(pair(module.stride if module.stride is not None else module.kernel_size)),
                             padding=np.array(pair(module.padding)))
        if module.ceil_mode or (np.any(np.atleast_1d(module.padding)) and not module.count_include_pad):
            self.refuse(node, "AvgPool2d with ceil_mode or padding left out of the count")
        pool.input_type = {"input": np.array((channels, height, width))}
        pool.output_type = {"output": np.array(self.shape(node))}
        return self.add_node(node.target, pool, self.inputs(node))

    def global_pool(self, name: str, argument: fx.Node) -> str:
        channels, height, width = self.shape(argument)
        pool = nir.AvgPool2d(kernel_size=np.array([height, width]), stride=np.array([height, width]),
                             padding=np.array([0, 0]))
        pool.input_type = {"input": np.array([channels, height, width])}
        pool.output_type = {"output": np.array([channels, 1, 1])}
        return self.add_node(f"{name}.pool", pool, self.value(argument))

    def site(self, node: fx.Node, site: IFSite) -> str:
        if site.reset_mode != "subtract":
            raise ConfigError(f"convert: site {node.target} resets to zero; only reset by subtraction is exported "
                              "(reset to zero leaves a converted ResNet at chance)")
        shape = self.shape(node)
        threshold = float(site.threshold)
        name = node.target
        integrator = self.add_node(f"{name}.integrator", nir.I(r=_full(shape, 1.0 / self.dt_s)), self.inputs(node))
        spike = self.add_node(f"{name}.spike", nir.Threshold(threshold=_full(shape, float(site.fire_level()))),
                              [integrator])
        reset = self.add_node(f"{name}.reset", nir.Scale(scale=_full(shape, -threshold)), [spike])
        self.edges.append((reset, integrator))
        self.spike_layers[spike] = name
        return self.add_node(name, nir.Scale(scale=_full(shape, threshold)), [spike])


def converted_to_nir(network: ConvertedNetwork, input_shape: tuple[int, int, int], timesteps: int, dt_s: float,
                     class_names: list[str], normalization: tuple[list[float], list[float]]) -> nir.NIRGraph:
    """The NIR graph of a calibrated ``network`` (its IF sites' thresholds set), full shapes on
    every node, with the metadata stars-deploy's readers check (exporters/nir_export.py's keys)."""
    lowering = _Lowering(network, tuple(input_shape), dt_s)
    for node in network.graph.graph.nodes:
        lowering.lower(node)
    mean, std = normalization
    metadata = {
        "format": NIR_FORMAT, vocabulary.DT_KEY: float(dt_s), "integrator": vocabulary.INTEGRATOR,
        "reset": vocabulary.RESET, "state_init": vocabulary.STATE_INIT, "timesteps": int(timesteps),
        "encoding": vocabulary.ENCODING, "readout": vocabulary.READOUT, "student_family": CONVERTED_FAMILY,
        "normalization": {"mean": [float(m) for m in mean], "std": [float(s) for s in std]},
        "class_names": list(class_names), "spike_layers": lowering.spike_layers,
    }
    return nir.NIRGraph(nodes=lowering.nodes, edges=lowering.edges, metadata=encode_metadata(metadata),
                        type_check=True)


def write_export(path: Path, network: ConvertedNetwork, spec: TeacherSpec, record: dict) -> dict:
    """The NIR file of a calibrated ``network`` at ``path`` (RUN_DIR/export/student.nir) and its
    export.json record beside it (the record returned)."""
    graph = converted_to_nir(network, spec.input_shape, record["timesteps"], record[DT_KEY], list(spec.classes),
                             tuple(list(v) for v in spec.mean_std))
    write_nir(path, graph)
    rows = graph_layer_table(graph)
    payload = merge_record(path.parent, {
        "target": "nir", "run_dir": str(path.parent.parent), "files": file_entries([path]), "input_shape": list(spec.input_shape),
        "output_shape": [spec.num_classes], "timesteps": record["timesteps"], "dt_s": record[DT_KEY],
        "parameters": sum(row["parameters"] for row in rows), "layers": rows})
    return payload


def export_converted(run_dir: Path, path: Path) -> dict:
    """``export --target nir`` of a converted run: the network rebuilt from convert.json (the
    teacher, whose checkpoint must still hash to the recorded sha256, and the thresholds) and
    its NIR file written again; byte for byte what `convert` wrote."""
    record = read_convert_record(run_dir)
    spec, source = record["spec"], Path(run_dir) / CONVERT
    weights = teacher_weights(spec)
    if record.get("teacher_sha256") and (weights is None or not Path(weights).is_file()
                                         or sha256_file(weights) != record["teacher_sha256"]):
        raise CheckpointError(f"{source}: the teacher checkpoint {weights} is missing or changed since the "
                              "conversion (sha256 differs): convert again")
    network = ConvertedNetwork(load_teacher(spec, weights), start=float(record.get("start", 0.5)))
    try:
        network.set_thresholds(record.get("thresholds") or [])
        return write_export(Path(path), network, spec, record)
    except (ConfigError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{source}: {exc}; restore it or convert again") from None
