r"""Any classifier as a teacher: an ``nn.Module`` with BatchNorm layers, or a ``torch.export``
program (``.pt2``), given the interface distillation needs.

Distillation reads three things from a teacher (synthesis.py, loop.py):

- its BatchNorm layers as ``nn.BatchNorm2d`` modules, whose forward hooks see each layer's
  input and output (L_BN, L_TAR);
- ``penultimate(x)``: the features RCA compares, B x d;
- ``head(features)``: the logits, with ``head(penultimate(x)) == forward(x)``.

The named architectures (models.py) have these natively. :class:`ClassifierTeacher` gives
them to any module: the head is the last ``nn.Linear`` that produces the module's output, and
the penultimate features are that layer's input, flattened (a forward hook captures it). A
module whose output no Linear produces (a convolutional head, say) gets ``head = identity``
and its logits as features: every term still works, RCA then compares logit relations.

A ``torch.export`` program has no modules, only ATen calls: :func:`program_teacher` turns each
eval-mode ``aten.batch_norm`` call into an ``nn.BatchNorm2d`` holding the program's own
tensors, and the final ``aten.linear`` into an ``nn.Linear``, so the same hooks apply. The
program's file is read with ``torch.load`` forced to ``weights_only`` (torch.export.load
falls back to a full unpickle otherwise): a program that needs Python objects is refused.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import fx, nn

from stars_deploy.errors import CheckpointError, ConfigError

PROGRAM_SUFFIX = ".pt2"
FORCE_WEIGHTS_ONLY = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
BATCH_PROBE = (1, 3)  # a teacher must take any batch size: checked with these
BATCH_NORM_OPS = {"aten.batch_norm.default"}
TRAINING_BATCH_NORM_OPS = {"aten._native_batch_norm_legit_functional.default", "aten._native_batch_norm_legit.default"}
LINEAR_OPS = {"aten.linear.default"}


class ClassifierTeacher(nn.Module):
    """``module`` with ``penultimate`` and ``head``: the input and the last ``nn.Linear``
    producing the output, found by one forward pass on ``example`` (or identity and the
    logits when no Linear produces it)."""

    def __init__(self, module: nn.Module, example: torch.Tensor, source: str = "teacher"):
        super().__init__()
        self.module = module if isinstance(module, fx.GraphModule) else module.eval()
        self.head = _output_linear(self.module, example, source) or nn.Identity()
        self._captured: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)

    def train(self, mode: bool = True) -> "ClassifierTeacher":
        """Set the mode flag of every submodule directly: torch.export's module refuses
        .train() and .eval() (its BatchNorms are rebuilt in eval mode and stay so unless asked)."""
        for module in self.modules():
            module.training = mode
        return self

    def penultimate(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.head, nn.Identity):
            return self.module(x)
        handle = self.head.register_forward_pre_hook(self._capture)
        try:
            self.module(x)
        finally:
            handle.remove()
        features, self._captured = self._captured, None
        return features.flatten(1)

    def _capture(self, module, inputs) -> None:
        self._captured = inputs[0]


def _output_linear(module: nn.Module, example: torch.Tensor, source: str) -> nn.Linear | None:
    """The nn.Linear whose output is the module's output (the last one called that is)."""
    calls: list[tuple[nn.Linear, torch.Tensor]] = []
    handles = [m.register_forward_hook(lambda m, i, o: calls.append((m, o)))
               for m in module.modules() if isinstance(m, nn.Linear)]
    try:
        with torch.no_grad():
            output = module(example)
    except Exception as exc:
        reason = str(exc).splitlines()[0] if str(exc) else ""
        raise ConfigError(f"{source}: running it on {len(example)} images of shape {tuple(example.shape[1:])} "
                          f"failed ({type(exc).__name__}: {reason}); a teacher must take any batch size of that "
                          "input shape: check --input-shape, and export programs with a dynamic batch dimension "
                          "(dynamic_shapes={'x': {0: torch.export.Dim('batch')}})") from None
    finally:
        for handle in handles:
            handle.remove()
    if not isinstance(output, torch.Tensor) or output.dim() != 2:
        raise ConfigError(f"{source}: a teacher must return logits of shape (batch, classes); it returned "
                          f"{type(output).__name__} {tuple(getattr(output, 'shape', ()))}")
    for linear, value in reversed(calls):
        if value.shape == output.shape and torch.equal(value, output):
            return linear
    return None


def batch_norm_count(module: nn.Module) -> int:
    return sum(isinstance(m, nn.BatchNorm2d) for m in module.modules())


def check_teacher(module: nn.Module, input_shape: tuple[int, ...], num_classes: int, source: str) -> None:
    """Refuse a teacher distillation cannot use: no BatchNorm2d, wrong output, fixed batch."""
    if batch_norm_count(module) == 0:
        raise ConfigError(f"{source} has no BatchNorm2d layer: data-free distillation matches the statistics "
                          "of BatchNorm layers, so the teacher needs some (in eval mode)")
    for batch in BATCH_PROBE:
        try:
            with torch.no_grad():
                logits = module(torch.zeros(batch, *input_shape))
        except Exception as exc:
            raise ConfigError(f"{source}: a batch of {batch} images of shape {tuple(input_shape)} fails "
                              f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); a "
                              "teacher must take any batch size (export it with a dynamic batch dimension)") from None
        if tuple(logits.shape) != (batch, num_classes):
            raise ConfigError(f"{source}: returns shape {tuple(logits.shape)} for {batch} images, expected "
                              f"({batch}, {num_classes}): check --num-classes and --input-shape")


# ---- torch.export programs ---------------------------------------------------------------------
@contextmanager
def _weights_only_loads():
    previous = os.environ.get(FORCE_WEIGHTS_ONLY)
    os.environ[FORCE_WEIGHTS_ONLY] = "1"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(FORCE_WEIGHTS_ONLY, None)
        else:
            os.environ[FORCE_WEIGHTS_ONLY] = previous


def load_program(path: Path) -> torch.export.ExportedProgram:
    """Read a ``torch.export.save`` file with every torch.load inside forced to weights_only."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"teacher program {path} does not exist" if not path.exists() else
                              f"teacher program {path} is a directory, not a .pt2 file")
    try:
        with _weights_only_loads():
            return torch.export.load(str(path))
    except Exception as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"cannot read teacher program {path}: {reason}. Save it with "
                              "torch.export.save(torch.export.export(model.eval(), ...), PATH); programs that "
                              "need Python objects beyond tensors are refused") from None


def _attribute(graph_module: fx.GraphModule, node: fx.Node) -> torch.Tensor | None:
    if node is None:
        return None
    if node.op != "get_attr":
        raise ConfigError(f"teacher program: node {node.name} is not a stored tensor")
    value = graph_module
    for part in str(node.target).split("."):
        value = getattr(value, part)
    return value


def _op(node: fx.Node) -> str:
    return str(node.target) if node.op == "call_function" else ""


def _as_batch_norm(graph_module: fx.GraphModule, node: fx.Node, index: int) -> nn.BatchNorm2d:
    source, weight, bias, mean, var = (list(node.args) + [None] * 5)[:5]
    training = node.args[5] if len(node.args) > 5 else node.kwargs.get("training", False)
    eps = node.args[7] if len(node.args) > 7 else node.kwargs.get("eps", 1e-5)
    if training:
        raise ConfigError("teacher program: a BatchNorm runs in training mode; export the model after .eval()")
    running_mean, running_var = _attribute(graph_module, mean), _attribute(graph_module, var)
    if running_mean is None or running_var is None:
        raise ConfigError("teacher program: a BatchNorm without running statistics cannot be matched")
    layer = nn.BatchNorm2d(running_mean.numel(), eps=float(eps), affine=weight is not None)
    with torch.no_grad():
        layer.running_mean.copy_(running_mean)
        layer.running_var.copy_(running_var)
        if weight is not None:
            layer.weight.copy_(_attribute(graph_module, weight))
            layer.bias.copy_(_attribute(graph_module, bias) if bias is not None else torch.zeros_like(layer.bias))
    return layer.eval()


def _as_linear(graph_module: fx.GraphModule, node: fx.Node) -> nn.Linear:
    weight = _attribute(graph_module, node.args[1])
    bias = _attribute(graph_module, node.args[2]) if len(node.args) > 2 else None
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    return layer


def program_module(program: torch.export.ExportedProgram, source: str = "teacher program") -> fx.GraphModule:
    """The program as a GraphModule whose BatchNorms (and final Linear) are real modules."""
    graph_module = program.module()
    nodes = list(graph_module.graph.nodes)
    if any(_op(node) in TRAINING_BATCH_NORM_OPS for node in nodes):
        raise ConfigError(f"{source}: its BatchNorms were exported in training mode; export after model.eval()")
    for index, node in enumerate(n for n in nodes if _op(n) in BATCH_NORM_OPS):
        name = f"stars_bn{index}"
        graph_module.add_submodule(name, _as_batch_norm(graph_module, node, index))
        with graph_module.graph.inserting_before(node):
            replacement = graph_module.graph.call_module(name, (node.args[0],))
        node.replace_all_uses_with(replacement)
        graph_module.graph.erase_node(node)
    output = next(node for node in graph_module.graph.nodes if node.op == "output")
    result = output.args[0][0] if isinstance(output.args[0], (tuple, list)) else output.args[0]
    if isinstance(result, fx.Node) and _op(result) in LINEAR_OPS:
        graph_module.add_submodule("stars_head", _as_linear(graph_module, result))
        with graph_module.graph.inserting_before(result):
            replacement = graph_module.graph.call_module("stars_head", (result.args[0],))
        result.replace_all_uses_with(replacement)
        graph_module.graph.erase_node(result)
    graph_module.graph.lint()
    graph_module.recompile()
    return graph_module  # torch.export's modules refuse .eval(); every rebuilt BatchNorm is in eval mode


def program_input_shape(program: torch.export.ExportedProgram) -> tuple[int, ...] | None:
    """(C, H, W) of the program's single input when it is fixed, else None."""
    placeholders = [spec for spec in program.graph_signature.input_specs if spec.kind.name == "USER_INPUT"]
    if len(placeholders) != 1:
        raise ConfigError(f"teacher program: {len(placeholders)} inputs; a teacher takes one image batch")
    for node in program.graph.nodes:
        if node.op == "placeholder" and node.name == placeholders[0].arg.name:
            shape = node.meta.get("val", None)
            if shape is None:
                return None
            dims = tuple(shape.shape)[1:]
            return tuple(int(d) for d in dims) if all(isinstance(d, int) for d in dims) else None
    return None


def program_teacher(path: Path, input_shape: tuple[int, ...] | None = None) -> tuple[ClassifierTeacher, tuple]:
    """(the teacher, its input shape) from a ``.pt2`` file."""
    program = load_program(path)
    shape = input_shape or program_input_shape(program)
    if shape is None:
        raise ConfigError(f"{path}: the program's input shape is not fixed: give --input-shape C,H,W")
    module = program_module(program, str(path))
    return ClassifierTeacher(module, torch.zeros(2, *shape), str(path)), tuple(shape)
