r"""The float reference executor for NIR graphs: every node, T steps, a batch, CPU or CUDA.

Its conventions (:data:`CONVENTIONS`, printed in every summary) are checked on load: a graph
that breaks them fails with an error naming the node or the metadata key.
"""

from __future__ import annotations

import time
from collections import defaultdict, deque

import nir
import numpy as np
import torch
import torch.nn.functional as F

from stars_deploy.exporters.nir_format import NIRFormatError, decode_metadata, read_nir
from stars_deploy.vocabulary import ACCEPTED_INTEGRATORS, ACCEPTED_RESETS

from .energy import loihi_energy
from .record import TargetResult
from .target import Target

NAME = "nir"

CONVENTIONS = """\
- time: explicit Euler at ``dt_s`` (graph metadata, or given by the caller for files from
  other tools); ``dt / tau`` must be at most 1 for every time constant, otherwise the file
  was written for another dt (snnTorch writes ``tau = dt / (1 - beta)``, ``r = tau / dt`` at
  its own dt = 1e-4 s) and the run would be meaningless;
- neurons, per step with input x (the sum of the node's inputs, in edge order)
  LIF      v += dt/tau * (r x + v_leak - v)
  CubaLIF  i += w_in x;  v += dt/tau_mem * ((v_leak - v) + r i);  i += -dt/tau_syn * i
  LI       v += dt/tau * (r x + v_leak - v), output v (no spikes)
  IF       v += dt * r x
  spike z = [v - v_threshold > 0] (strict), then v = (1 - z) v + z v_reset ("reset = value");
  v starts at v_leak, i at 0 (0 for IF), at the start of every sample. These are Norse's
  operation orders with float32 rates ``1/tau`` computed in float64, so a Norse student and
  its export agree spike for spike;
- stateless nodes (Affine, Linear, Scale, Conv2d, Flatten, SumPool2d, AvgPool2d, Threshold)
  act on each step independently; shapes carry no batch dimension;
- input: the Input node receives the same tensor at every step (direct encoding) unless a
  (T, B, ...) sequence is given; the decision is the argmax of the Output's mean over T;
- no synaptic delays: the output at step t depends on the input at step t (pipeline delay 0).
"""
LATENCY_NOTE = "float reference: no synaptic or pipeline delay; the decision is read after T steps"
SPIKING = (nir.IF, nir.LIF, nir.CubaLIF, nir.Threshold)
STATEFUL = (nir.IF, nir.LI, nir.LIF, nir.CubaLIF)
STATELESS = (nir.Affine, nir.Linear, nir.Scale, nir.Conv2d, nir.Flatten, nir.SumPool2d,
             nir.AvgPool2d, nir.Threshold)
SUPPORTED = (nir.Input, nir.Output) + STATEFUL + STATELESS
MAX_EULER_RATIO = 1.0  # dt / tau above this: explicit Euler overshoots the fixed point


def conventions() -> str:
    """The conventions this executor assumes, as one paragraph for users."""
    return " ".join(CONVENTIONS.split())


def _tensor(array, device, dtype=torch.float32) -> torch.Tensor:
    return torch.as_tensor(np.asarray(array), dtype=dtype, device=device)


def _parameter(array, device) -> torch.Tensor:
    """float32 parameter; a 0-dim tensor when all values are equal (Norse's scalar parameters)."""
    values = np.asarray(array, dtype=np.float64)
    if values.size and np.all(values == values.flat[0]):
        return torch.as_tensor(values.flat[0], dtype=torch.float32)
    return torch.as_tensor(values, dtype=torch.float32, device=device)


def _rate(tau, device) -> torch.Tensor:
    """1/tau in 1/s, computed in float64 and rounded once to float32 (as Norse's tau_mem_inv)."""
    return _parameter(1.0 / np.asarray(tau, dtype=np.float64), device)


def _conv_geometry(node: nir.Conv2d) -> tuple:
    """(stride, padding, dilation) of a NIR Conv2d as F.conv2d takes them."""
    padding = node.padding if isinstance(node.padding, str) else tuple(int(p) for p in np.atleast_1d(node.padding))
    return (tuple(int(s) for s in np.atleast_1d(node.stride)), padding,
            tuple(int(d) for d in np.atleast_1d(node.dilation)))


def _over_steps(tensor: torch.Tensor, steps: int) -> torch.Tensor:
    """A per-sample (B, ...) value repeated over T steps as a (T, B, ...) view."""
    return tensor.unsqueeze(0).expand(steps, *tensor.shape)


def _is_one(array) -> bool:
    return bool(np.all(np.asarray(array) == 1))


class NIRReference:
    """Runs a NIR graph (already read) for T steps on a batch; returns a TargetResult."""

    def __init__(self, graph: nir.NIRGraph, dt_s: float | None = None, timesteps: int | None = None,
                 device: str | torch.device = "cpu", source: str = "graph"):
        self.graph, self.source, self.device = graph, source, torch.device(device)
        self.metadata = decode_metadata(getattr(graph, "metadata", None) if isinstance(graph.metadata, dict) else {})
        self._check_metadata()
        self.dt_s = float(dt_s if dt_s is not None else self.metadata.get("dt_s", np.nan))
        self.timesteps = int(timesteps or self.metadata.get("timesteps", 0))
        self.spike_names = dict(self.metadata.get("spike_layers", {}))
        self.inputs_of = defaultdict(list)
        self.successors = defaultdict(list)
        for source_name, target_name in graph.edges:
            self.inputs_of[target_name].append(source_name)
            self.successors[source_name].append(target_name)
        self.order = self._topological_order()
        self.input_name = self._single(nir.Input)
        self.output_name = self._single(nir.Output)
        self.ops = {name: self._compile(name, graph.nodes[name]) for name in self.order}

    # ---- validation -------------------------------------------------------------------------
    def _check_metadata(self) -> None:
        reset = self.metadata.get("reset")
        if reset is not None and reset not in ACCEPTED_RESETS:
            raise NIRFormatError(f"{self.source}: metadata reset = {reset!r}, but the NIR reference "
                                 f"resets to v_reset ({' or '.join(ACCEPTED_RESETS)}); it cannot run this graph")
        integrator = self.metadata.get("integrator")
        if integrator is not None and integrator not in ACCEPTED_INTEGRATORS:
            raise NIRFormatError(f"{self.source}: metadata integrator = {integrator!r}; only "
                                 f"{', '.join(ACCEPTED_INTEGRATORS)} is supported")

    def _single(self, kind) -> str:
        names = [name for name, node in self.graph.nodes.items() if isinstance(node, kind)]
        if len(names) != 1:
            raise NIRFormatError(f"{self.source}: the NIR reference needs exactly one {kind.__name__} "
                                 f"node, found {len(names)} ({', '.join(names) or 'none'})")
        return names[0]

    def _topological_order(self) -> list[str]:
        nodes = self.graph.nodes
        for source_name, target_name in self.graph.edges:
            for name in (source_name, target_name):
                if name not in nodes:
                    raise NIRFormatError(f"{self.source}: edge ({source_name} -> {target_name}) names "
                                         f"node {name!r}, which is not in the graph")
        indegree = {name: len(self.inputs_of[name]) for name in nodes}
        ready = deque(sorted(name for name, degree in indegree.items() if degree == 0))
        order = []
        while ready:
            name = ready.popleft()
            order.append(name)
            for target_name in self.successors[name]:
                indegree[target_name] -= 1
                if indegree[target_name] == 0:
                    ready.append(target_name)
        if len(order) != len(nodes):
            cyclic = sorted(set(nodes) - set(order))
            raise NIRFormatError(f"{self.source}: recurrent connections (a cycle through "
                                 f"{', '.join(cyclic)}) are not supported by the NIR reference")
        return order

    def _check_tau(self, name: str, tau) -> None:
        tau = np.asarray(tau, dtype=np.float64)
        if not np.isfinite(self.dt_s) or self.dt_s <= 0:
            raise NIRFormatError(f"{self.source}: node {name!r} has time constants but the graph has no "
                                 "metadata dt_s; give the integration step (--dt-s SECONDS)")
        if np.any(tau <= 0) or np.any(self.dt_s / tau > MAX_EULER_RATIO):
            raise NIRFormatError(
                f"{self.source}: node {name!r} has tau down to {tau.min():.3g} s, below dt = {self.dt_s:g} s "
                "(dt/tau > 1): explicit Euler at this dt is unstable. The file was written for another "
                "dt convention; give the right --dt-s")

    # ---- compilation ------------------------------------------------------------------------
    def _compile(self, name: str, node):
        if not isinstance(node, SUPPORTED):
            raise NIRFormatError(f"{self.source}: node {name!r} is a {type(node).__name__}, which the NIR "
                                 f"reference does not support (supported: "
                                 f"{', '.join(sorted(k.__name__ for k in SUPPORTED))})")
        dev = self.device
        if isinstance(node, nir.Affine):
            weight, bias = _tensor(node.weight, dev), _tensor(node.bias, dev)
            return lambda x: F.linear(x, weight, bias)
        if isinstance(node, nir.Linear):
            weight = _tensor(node.weight, dev)
            return lambda x: F.linear(x, weight)
        if isinstance(node, nir.Scale):
            scale = _tensor(node.scale, dev)
            return lambda x: x * scale
        if isinstance(node, nir.Conv2d):
            weight, bias = _tensor(node.weight, dev), _tensor(node.bias, dev)
            stride, padding, dilation = _conv_geometry(node)
            return lambda x: F.conv2d(x, weight, bias, stride, padding, dilation, int(node.groups))
        if isinstance(node, nir.Flatten):
            start = int(node.start_dim) + 1 if int(node.start_dim) >= 0 else int(node.start_dim)
            end = int(node.end_dim) + 1 if int(node.end_dim) >= 0 else int(node.end_dim)
            return lambda x: x.flatten(start, end)
        if isinstance(node, (nir.SumPool2d, nir.AvgPool2d)):
            kernel = tuple(int(k) for k in np.atleast_1d(node.kernel_size))
            stride = tuple(int(s) for s in np.atleast_1d(node.stride))
            padding = tuple(int(p) for p in np.atleast_1d(node.padding))
            divisor = 1 if isinstance(node, nir.SumPool2d) else None
            return lambda x: F.avg_pool2d(x, kernel, stride, padding, divisor_override=divisor)
        if isinstance(node, nir.Threshold):
            threshold = _tensor(node.threshold, dev)
            return lambda x: torch.gt(x - threshold, 0.0).to(x.dtype)
        if isinstance(node, nir.LIF):
            self._check_tau(name, node.tau)
            return self._lif(node)
        if isinstance(node, nir.CubaLIF):
            self._check_tau(name, node.tau_mem)
            self._check_tau(name, node.tau_syn)
            return self._cuba_lif(node)
        if isinstance(node, nir.LI):
            self._check_tau(name, node.tau)
            return self._li(node)
        if isinstance(node, nir.IF):
            if not np.isfinite(self.dt_s):
                raise NIRFormatError(f"{self.source}: node {name!r} (IF) needs metadata dt_s")
            return self._if(node)
        return None  # Input and Output pass their value through

    def _lif(self, node: nir.LIF):
        dt, dev = self.dt_s, self.device
        tau_mem_inv, v_leak = _rate(node.tau, dev), _parameter(node.v_leak, dev)
        v_th, v_reset = _parameter(node.v_threshold, dev), _parameter(node.v_reset, dev)
        r = None if _is_one(node.r) else _parameter(node.r, dev)

        def step(x, state):
            v = v_leak if state is None else state
            if r is not None:
                x = r * x
            dv = dt * tau_mem_inv * (x + v_leak - v)  # Norse lif_box_feed_forward_step
            v_decayed = v + dv
            z = torch.gt(v_decayed - v_th, 0.0).to(v_decayed.dtype)
            return z, (1 - z) * v_decayed + z * v_reset
        return step

    def _cuba_lif(self, node: nir.CubaLIF):
        dt, dev = self.dt_s, self.device
        tau_mem_inv, tau_syn_inv = _rate(node.tau_mem, dev), _rate(node.tau_syn, dev)
        v_leak, v_th, v_reset = (_parameter(a, dev) for a in (node.v_leak, node.v_threshold, node.v_reset))
        r = None if _is_one(node.r) else _parameter(node.r, dev)
        w_in = None if _is_one(node.w_in) else _parameter(node.w_in, dev)

        def step(x, state):
            v, i = (v_leak, torch.zeros_like(x)) if state is None else state
            i_new = i + (x if w_in is None else w_in * x)  # Norse lif_feed_forward_step
            i_drive = i_new if r is None else r * i_new
            dv = dt * tau_mem_inv * ((v_leak - v) + i_drive)
            v_decayed = v + dv
            di = -dt * tau_syn_inv * i_new
            i_decayed = i_new + di
            z = torch.gt(v_decayed - v_th, 0.0).to(v_decayed.dtype)
            return z, ((1 - z) * v_decayed + z * v_reset, i_decayed)
        return step

    def _li(self, node: nir.LI):
        dt, dev = self.dt_s, self.device
        tau_inv, v_leak = _rate(node.tau, dev), _parameter(node.v_leak, dev)
        r = None if _is_one(node.r) else _parameter(node.r, dev)

        def step(x, state):
            v = v_leak if state is None else state
            v_new = v + dt * tau_inv * ((x if r is None else r * x) + v_leak - v)
            return v_new, v_new
        return step

    def _if(self, node: nir.IF):
        dt, dev = self.dt_s, self.device
        r = _parameter(node.r, dev)
        v_th, v_reset = _parameter(node.v_threshold, dev), _parameter(node.v_reset, dev)

        def step(x, state):
            v = (torch.zeros_like(x) if state is None else state) + dt * r * x
            z = torch.gt(v - v_th, 0.0).to(v.dtype)
            return z, (1 - z) * v + z * v_reset
        return step

    # ---- execution --------------------------------------------------------------------------
    @torch.no_grad()
    def run(self, inputs: torch.Tensor, timesteps: int | None = None) -> TargetResult:
        """Run ``inputs`` — (B, *input shape), the same at every step, or (T, B, *input shape) —
        and return the record (spikes of every spiking node, logits over time, synops)."""
        steps = int(timesteps or self.timesteps)
        if steps < 1:
            raise NIRFormatError(f"{self.source}: no number of steps: the graph has no metadata "
                                 "timesteps; give --timesteps")
        start = time.perf_counter()
        input_shape = tuple(int(s) for s in self.graph.nodes[self.input_name].input_type["input"])
        inputs = inputs.to(self.device, torch.float32)
        size = int(np.prod(input_shape))
        # (B, ...) with one sample's worth of values per row is constant input; (T, B, ...) a sequence
        constant = int(np.prod(inputs.shape[1:])) == size
        if not constant and not (inputs.dim() >= 2 and int(np.prod(inputs.shape[2:])) == size):
            raise NIRFormatError(f"{self.source}: input node {self.input_name!r} takes {input_shape}, "
                                 f"got inputs of shape {tuple(inputs.shape)}")
        inputs = inputs.reshape(*inputs.shape[:1 if constant else 2], *input_shape)
        # a value is (tensor, constant): constant tensors are (B, ...) and the same every step
        values: dict[str, tuple[torch.Tensor, bool]] = {}
        spikes: dict[str, torch.Tensor] = {}
        for name in self.order:
            node, op = self.graph.nodes[name], self.ops[name]
            if name == self.input_name:
                values[name] = (inputs, constant)
                continue
            value, is_constant = self._gather(name, values, steps)
            if isinstance(node, STATEFUL):
                sequence = _over_steps(value, steps) if is_constant else value
                state, outputs = None, []
                for current in sequence:
                    out, state = op(current, state)
                    outputs.append(out)
                value, is_constant = torch.stack(outputs), False
            elif op is not None:
                value = op(value) if is_constant else op(value.flatten(0, 1)).unflatten(0, value.shape[:2])
            values[name] = (value, is_constant)
            if isinstance(node, SPIKING):
                full = _over_steps(value, steps) if is_constant else value
                spikes[self.spike_names.get(name, name)] = full
        logits, is_constant = values[self.output_name]
        if is_constant:
            logits = _over_steps(logits, steps)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        run_s = time.perf_counter() - start
        node_of = {self.spike_names.get(n, n): n for n in self.order}
        synops = {layer: self._synops(node_of[layer], s) for layer, s in spikes.items()}
        neurons = sum(int(np.prod(self.graph.nodes[name].output_type["output"])) for name in self.order
                      if isinstance(self.graph.nodes[name], STATEFUL))
        return TargetResult(NAME, logits.contiguous(), spikes, synops,
                            {"run_s": run_s, "synops_s": time.perf_counter() - start - run_s},
                            latency_steps=steps, pipeline_delay_steps=0,
                            neuron_updates=float(neurons * steps * inputs.shape[-len(input_shape) - 1]), energy=loihi_energy)

    def _gather(self, name: str, values, steps: int) -> tuple[torch.Tensor, bool]:
        sources = self.inputs_of[name]
        if not sources:
            raise NIRFormatError(f"{self.source}: node {name!r} has no input edge")
        parts = [values[source] for source in sources]
        if len(parts) == 1:
            return parts[0]
        all_constant = all(is_constant for _, is_constant in parts)
        tensors = [t if all_constant or not c else _over_steps(t, steps) for t, c in parts]
        total = tensors[0]
        for tensor in tensors[1:]:  # merges (residual adds) sum in edge order
            total = total + tensor
        return total, all_constant

    def _synops(self, name: str, spikes: torch.Tensor) -> float:
        """Synaptic events caused by ``spikes`` (T, B, ...) of node ``name``: each spike times
        the number of connections leaving its neuron, through Flatten nodes."""
        flat = spikes.flatten(0, 1)
        total = 0.0
        for target_name in self.successors[name]:
            node = self.graph.nodes[target_name]
            if isinstance(node, nir.Flatten):
                total += self._synops(target_name, self.ops[target_name](flat).unflatten(0, spikes.shape[:2]))
            elif isinstance(node, (nir.Affine, nir.Linear)):
                total += float(flat.sum()) * int(np.asarray(node.weight).shape[0])
            elif isinstance(node, nir.Conv2d) and int(node.groups) == 1:
                weight = torch.ones((1, 1, *np.asarray(node.weight).shape[2:]), device=flat.device)
                hits = F.conv2d(flat.sum(1, keepdim=True), weight, None, *_conv_geometry(node))
                total += float(hits.sum()) * int(np.asarray(node.weight).shape[0])
            elif isinstance(node, nir.Conv2d):
                total += float(flat.sum()) * int(np.asarray(node.weight)[0].size)
            elif isinstance(node, (nir.SumPool2d, nir.AvgPool2d)):
                total += float(self.ops[target_name](flat).sum()) * (
                    1 if isinstance(node, nir.SumPool2d) else int(np.prod(np.atleast_1d(node.kernel_size))))
            else:
                total += float(flat.sum())
        return total


def load_reference(path, dt_s: float | None = None, timesteps: int | None = None,
                   device: str = "cpu") -> NIRReference:
    """Read a .nir file (type-checked) and prepare the reference executor for it."""
    return NIRReference(read_nir(path), dt_s=dt_s, timesteps=timesteps, device=device, source=str(path))


TARGET = Target(
    NAME, export="nir", summary="float reference executor of the .nir file (CPU or CUDA)",
    load=lambda path, options: load_reference(path, options.dt_s, options.timesteps, options.device),
    latency_note=LATENCY_NOTE, conventions=conventions(), energy=loihi_energy)
