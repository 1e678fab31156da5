"""The layer table of a student, from its family's graph description (no NIR needed).

:class:`LayerTable` implements ``students.GraphBuilder``: it follows the family's
``describe`` and records, per node, its type, input and output shapes (no batch dimension)
and parameter count. The NIR builder (nir_export.py) extends it, so both exports print the
same table for the same student.
"""

from __future__ import annotations

from torch import nn

from stars_deploy.errors import ConfigError
from stars_deploy.students import LIFConfig


def _conv_output(shape: tuple[int, ...], conv: nn.Conv2d) -> tuple[int, int, int]:
    _, height, width = shape
    sides = []
    for side, k, s, p, d in zip((height, width), conv.kernel_size, conv.stride, conv.padding, conv.dilation):
        sides.append((side + 2 * p - d * (k - 1) - 1) // s + 1)
    return (conv.out_channels, *sides)


def _parameters(*tensors) -> int:
    return sum(int(t.numel()) for t in tensors if t is not None)


class LayerTable:
    """Rows ``{name, type, input_shape, output_shape, parameters[, kernel, stride]}`` in the
    order the family describes its nodes; starts with the node ``input``."""

    def __init__(self, input_shape: tuple[int, ...]):
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.rows: list[dict] = []
        self.edges: list[tuple[str, str]] = []
        self.record("input", "Input", input_shape, input_shape, 0, [])

    def record(self, name: str, kind: str, shape_in, shape_out, parameters: int, sources: list[str],
               **extra) -> str:
        if name in self.shapes:
            raise ConfigError(f"export: node name {name!r} used twice")
        self.shapes[name] = tuple(int(s) for s in shape_out)
        self.edges.extend((source, name) for source in sources)
        self.rows.append({"name": name, "type": kind,
                          "input_shape": None if shape_in is None else [int(s) for s in shape_in],
                          "output_shape": [int(s) for s in shape_out], "parameters": parameters, **extra})
        return name

    def conv(self, name: str, conv: nn.Conv2d, source: str) -> str:
        if not isinstance(conv, nn.Conv2d) or conv.bias is None:
            raise ConfigError(f"export: {name} must be a folded Conv2d with a bias")
        shape = self.shapes[source]
        return self.record(name, "Conv2d", shape, _conv_output(shape, conv), _parameters(conv.weight, conv.bias),
                           [source], kernel=list(conv.kernel_size), stride=list(conv.stride))

    def neuron(self, name: str, lif: LIFConfig, sources: list[str]) -> str:
        shape = self.shapes[sources[0]]
        return self.record(name, "LIF" if lif.tau_syn_s is None else "CubaLIF", shape, shape, 0, sources)

    def flatten(self, name: str, source: str) -> str:
        shape = self.shapes[source]
        size = 1
        for side in shape:
            size *= side
        return self.record(name, "Flatten", shape, (size,), 0, [source])

    def affine(self, name: str, linear: nn.Linear, source: str) -> str:
        return self.record(name, "Affine", self.shapes[source], (linear.out_features,),
                           _parameters(linear.weight, linear.bias), [source])

    def global_avg_pool(self, name: str, source: str) -> str:
        channels = self.shapes[source][0]
        return self.record(name, "AvgPool2d", self.shapes[source], (channels, 1, 1), 0, [source])

    def output(self, source: str, classes: int) -> str:
        return self.record("output", "Output", (classes,), (classes,), 0, [source])
