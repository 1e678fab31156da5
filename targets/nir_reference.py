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

from stars_deploy.exporters.nir_format import NIR_FORMAT, NIRFormatError, decode_metadata, read_nir
from stars_deploy.vocabulary import ACCEPTED_INTEGRATORS, ACCEPTED_RESETS

from .energy import loihi_energy
from .record import TargetResult
from .stimulus import split_inputs
from .target import Target

NAME = "nir"

CONVENTIONS = """\
- time: explicit Euler at ``dt_s`` (graph metadata, or given by the caller for files from
  other tools); ``dt / tau`` must be at most 1 for every time constant, otherwise the file
  was written for another dt (snnTorch writes ``tau = dt / (1 - beta)``, ``r = tau / dt`` at
  its own dt = 1e-4 s) and the run would be meaningless;
- neurons, per step with input x (the sum of the node's inputs, in edge order)
  LIF      v += dt/tau * (r x + v_leak - v)
  CubaLIF  i += dt/tau_syn * (w_in x - i);  v += dt/tau_mem * ((v_leak - v) + r i)  (NIR's
           CubaLIF by Euler, the current first), computed as i' = s + g x, v from i',
           s = i' - dt/tau_syn i' with g = w_in dt/tau_syn (Norse LIFCell's order: with
           g = 1 within float32 rounding, i.e. w_in = tau_syn/dt, it is Norse's update)
  LI       v += dt/tau * (r x + v_leak - v), output v (no spikes)
  IF       v += dt * r x
  I        v += dt * r x, output v (an integrator: with a Threshold and a Scale fed back into it,
           reset by subtraction, as a converted teacher's graph holds it: exporters/converted_nir.py)
  spike z = [v - v_threshold > 0] (strict), then v = (1 - z) v + z v_reset ("reset = value");
  v starts at v_leak, i at 0 (0 for IF), at the start of every sample. These are Norse's
  operation orders with float32 rates ``1/tau`` computed in float64, so a Norse student and
  its export agree spike for spike;
- recurrence: an edge that closes a cycle (found by a depth-first walk from the Input,
  successors in the file's edge order) carries its source's value of the previous step; at a
  sample's first step, the value its source computes with every neuron's output 0 (a recurrent
  Affine gives its bias); every other edge carries the current step's value. So a recurrent
  layer ``lif -> w_rec -> lif`` gets ``W x_t + W_rec z_{t-1}``, as the NIR paper's recurrent
  networks run on its platforms (snnTorch's RSynaptic, nirtorch's executor). A cycle without
  a neuron (an algebraic loop) is refused, naming only its nodes;
- stateless nodes (Affine, Linear, Scale, Conv2d, Flatten, SumPool2d, AvgPool2d, Threshold)
  act on each step independently; shapes carry no batch dimension;
- input: (B, *shape) is the same at every step (direct encoding), (T, B, *shape) one value per
  step (targets/stimulus.py: an exact trailing shape decides, an ambiguous flat shape needs
  ``sequence=``); the decision is the argmax of the Output's mean over T;
- sanity: a time constant of more than 10^4 steps, or an IF that integrates less than 1 %
  of its input over a sample (T dt r < 0.01), is a warning (the file was likely written for
  another dt: Sinabs counts time in steps, --dt-s 1); so is a run in which no node spiked;
- no synaptic delays: the output at step t depends on the input at step t (pipeline delay 0).
"""
LATENCY_NOTE = "float reference: no synaptic or pipeline delay; the decision is read after T steps"
SPIKING = (nir.IF, nir.LIF, nir.CubaLIF, nir.Threshold)
STATEFUL = (nir.IF, nir.I, nir.LI, nir.LIF, nir.CubaLIF)
STATELESS = (nir.Affine, nir.Linear, nir.Scale, nir.Conv2d, nir.Flatten, nir.SumPool2d,
             nir.AvgPool2d, nir.Threshold)
SUPPORTED = (nir.Input, nir.Output) + STATEFUL + STATELESS
MAX_EULER_RATIO = 1.0  # dt / tau above this: explicit Euler overshoots the fixed point
MAX_PLAUSIBLE_TAU_STEPS = 1e4  # tau / dt above this: the neuron barely leaks or integrates at this dt
MIN_PLAUSIBLE_IF_GAIN = 1e-2  # T dt r below this: an IF takes under 1 % of its input in a sample
# What one batch's values may take: every node's output is kept for all T steps (the spikes are
# recorded, the merges read their sources), so a converted ResNet at T = 32 runs ~30 samples at a time
BATCH_MEMORY_BYTES = 2 * 2**30
UNIT_GAIN_TOLERANCE = 1e-6  # |w_in dt / tau_syn - 1| below this is 1 (float32 rounding of tau_syn / dt)


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
        self.input_name = self._single(nir.Input)
        self.output_name = self._single(nir.Output)
        self.warnings: list[str] = []
        self.delayed = self._recurrent_edges()
        self.order = self._topological_order()
        self.plan = self._plan(self._cycles())
        self.order = [name for component in self.plan for name in component]
        self.ops = {name: self._compile(name, graph.nodes[name]) for name in self.order}
        self.max_batch = self._max_batch()

    def _max_batch(self) -> int:
        """The most samples per call whose values fit BATCH_MEMORY_BYTES (float32, all T steps)."""
        per_step = 0
        for node in self.graph.nodes.values():
            shape = next(iter(node.output_type.values()), None) if node.output_type else None
            if shape is not None and all(s is not None for s in np.atleast_1d(shape)):
                per_step += int(np.prod(np.atleast_1d(shape).astype(np.int64)))
        return max(1, BATCH_MEMORY_BYTES // max(1, 4 * per_step * max(self.timesteps, 1)))

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

    def _recurrent_edges(self) -> set[tuple[str, str]]:
        """The edges that close a cycle: back edges of a depth-first walk from the Input
        (successors in edge order), then from any node it did not reach (sorted)."""
        nodes = self.graph.nodes
        for source_name, target_name in self.graph.edges:
            for name in (source_name, target_name):
                if name not in nodes:
                    raise NIRFormatError(f"{self.source}: edge ({source_name} -> {target_name}) names "
                                         f"node {name!r}, which is not in the graph")
        state, back = {}, set()  # state: 1 on the walk's stack, 2 done
        for root in [self.input_name] + sorted(nodes):
            if root in state:
                continue
            stack = [(root, iter(self.successors[root]))]
            state[root] = 1
            while stack:
                name, successors = stack[-1]
                following = next(successors, None)
                if following is None:
                    state[name] = 2
                    stack.pop()
                elif state.get(following) == 1:
                    back.add((name, following))
                elif following not in state:
                    state[following] = 1
                    stack.append((following, iter(self.successors[following])))
        return back

    def _topological_order(self) -> list[str]:
        """Nodes in an order that respects every edge except the recurrent (delayed) ones."""
        nodes = self.graph.nodes
        forward = [(a, b) for a, b in self.graph.edges if (a, b) not in self.delayed]
        indegree = {name: 0 for name in nodes}
        for _, target_name in forward:
            indegree[target_name] += 1
        ready = deque(sorted(name for name, degree in indegree.items() if degree == 0))
        order = []
        while ready:
            name = ready.popleft()
            order.append(name)
            for a, target_name in forward:
                if a == name:
                    indegree[target_name] -= 1
                    if indegree[target_name] == 0:
                        ready.append(target_name)
        return order

    def _plan(self, cycles: list[list[str]]) -> list[list[str]]:
        """The execution plan: components (one node, or a cycle run step by step) in an order
        that respects every edge between components."""
        component_of = {name: (name,) for name in self.order}
        for members in cycles:
            for member in members:
                component_of[member] = tuple(members)
        position = {name: i for i, name in enumerate(self.order)}
        components = sorted(set(component_of.values()), key=lambda c: min(position[n] for n in c))
        indegree = {c: 0 for c in components}
        after = defaultdict(set)
        for a, b in self.graph.edges:
            ca, cb = component_of[a], component_of[b]
            if ca != cb and cb not in after[ca]:
                after[ca].add(cb)
                indegree[cb] += 1
        ready = [c for c in components if indegree[c] == 0]
        plan = []
        while ready:
            ready.sort(key=lambda c: min(position[n] for n in c))
            component = ready.pop(0)
            plan.append(list(component))
            for following in after[component]:
                indegree[following] -= 1
                if indegree[following] == 0:
                    ready.append(following)
        return plan

    def _cycles(self) -> list[list[str]]:
        """The strongly connected components with a cycle, each in execution order; a
        component without a neuron is an algebraic loop and refused, naming its nodes only."""
        index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

        def visit(root):
            work = [(root, iter(self.successors[root]))]
            index[root] = low[root] = counter[0]
            counter[0] += 1
            stack.append(root)
            on_stack.add(root)
            while work:
                name, successors = work[-1]
                following = next(successors, None)
                if following is not None:
                    if following not in index:
                        index[following] = low[following] = counter[0]
                        counter[0] += 1
                        stack.append(following)
                        on_stack.add(following)
                        work.append((following, iter(self.successors[following])))
                    elif following in on_stack:
                        low[name] = min(low[name], index[following])
                    continue
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[name])
                if low[name] == index[name]:
                    members = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        members.append(member)
                        if member == name:
                            break
                    if len(members) > 1 or name in self.successors[name]:
                        found.append(members)

        for name in self.graph.nodes:
            if name not in index:
                visit(name)
        position = {name: i for i, name in enumerate(self.order)}
        cycles = []
        for members in found:
            members = sorted(members, key=position.__getitem__)
            if not any(isinstance(self.graph.nodes[m], STATEFUL) for m in members):
                raise NIRFormatError(f"{self.source}: nodes {', '.join(members)} form a cycle without a neuron "
                                     "(an algebraic loop, undefined in NIR's continuous time): put a neuron on it")
            cycles.append(members)
        return cycles

    def _check_tau(self, name: str, tau) -> None:
        tau = np.asarray(tau, dtype=np.float64)
        if not np.isfinite(self.dt_s) or self.dt_s <= 0:
            raise NIRFormatError(f"{self.source}: node {name!r} has time constants but the graph has no "
                                 "metadata dt_s; give the integration step (--dt-s SECONDS)")
        if not np.all(np.isfinite(tau)):
            raise NIRFormatError(f"{self.source}: node {name!r} has a NaN or Inf time constant")
        if np.any(tau <= 0) or np.any(self.dt_s / tau > MAX_EULER_RATIO):
            raise NIRFormatError(
                f"{self.source}: node {name!r} has tau down to {tau.min():.3g} s, below dt = {self.dt_s:g} s "
                "(dt/tau > 1): explicit Euler at this dt is unstable. The file was written for another "
                "dt convention; give the right --dt-s")
        if tau.size and float(tau.max()) / self.dt_s > MAX_PLAUSIBLE_TAU_STEPS:
            self.warnings.append(
                f"node {name!r}: tau = {tau.max():.3g} s is {tau.max() / self.dt_s:,.0f} steps of dt = {self.dt_s:g} s: "
                "the neuron barely leaks and takes dt/tau of its input per step, so it will likely stay silent; "
                "was the file written for another dt (--dt-s)?")

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
            return self._cuba_lif(node, name)
        if isinstance(node, nir.LI):
            self._check_tau(name, node.tau)
            return self._li(node)
        if isinstance(node, (nir.I, nir.IF)) and (not np.isfinite(self.dt_s) or self.dt_s <= 0):
            raise NIRFormatError(f"{self.source}: node {name!r} ({type(node).__name__}) needs metadata dt_s; "
                                 "give --dt-s SECONDS")
        if isinstance(node, nir.I):
            return self._integrator(node)
        if isinstance(node, nir.IF):
            gain = self.timesteps * self.dt_s * float(np.abs(np.asarray(node.r, np.float64)).max(initial=0))
            if self.timesteps and gain < MIN_PLAUSIBLE_IF_GAIN:
                self.warnings.append(
                    f"node {name!r} (IF): v += dt r x integrates at most T dt r = {gain:.3g} of its input over a "
                    f"sample of T = {self.timesteps} steps at dt = {self.dt_s:g} s, so it will likely stay silent; "
                    "files from Sinabs count time in steps (--dt-s 1)")
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

    def _input_gain(self, name: str, node: nir.CubaLIF):
        """g = w_in dt / tau_syn, float32 (None when it is 1 within float32 rounding: the
        exporter writes w_in = tau_syn / dt, and Norse's update is then bit for bit ours)."""
        gain = np.asarray(node.w_in, np.float64) * self.dt_s / np.asarray(node.tau_syn, np.float64)
        if not np.all(np.isfinite(gain)):
            raise NIRFormatError(f"{self.source}: node {name!r} has a NaN or Inf w_in")
        if np.all(np.abs(gain - 1) < UNIT_GAIN_TOLERANCE):
            return None
        if (self.metadata.get("format") == NIR_FORMAT and _is_one(node.w_in)):
            raise NIRFormatError(f"{self.source}: node {name!r} has w_in = 1 with tau_syn = "
                                 f"{np.asarray(node.tau_syn).max():g} s: the file was written by stars-deploy before it "
                                 "adopted NIR's CubaLIF convention (w_in = tau_syn/dt); re-export it "
                                 "(stars-deploy export --target nir RUN_DIR)")
        return _parameter(gain, self.device)

    def _cuba_lif(self, node: nir.CubaLIF, name: str = "cuba"):
        dt, dev = self.dt_s, self.device
        tau_mem_inv, tau_syn_inv = _rate(node.tau_mem, dev), _rate(node.tau_syn, dev)
        v_leak, v_th, v_reset = (_parameter(a, dev) for a in (node.v_leak, node.v_threshold, node.v_reset))
        r = None if _is_one(node.r) else _parameter(node.r, dev)
        w_in = self._input_gain(name, node)

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

    def _integrator(self, node: nir.I):
        dt, r = self.dt_s, _parameter(node.r, self.device)

        def step(x, state):
            v = (torch.zeros_like(x) if state is None else state) + dt * r * x
            return v, v
        return step

    # ---- execution --------------------------------------------------------------------------
    @torch.no_grad()
    def run(self, inputs: torch.Tensor, timesteps: int | None = None, sequence: bool | None = None) -> TargetResult:
        """Run ``inputs`` — (B, *input shape), the same at every step, or (T, B, *input shape),
        one value per step; ``sequence`` says which where the shape alone cannot (a flat
        (T, 1, N)); targets/stimulus.py — and return the record (spikes of every spiking node,
        logits over time, synops)."""
        steps = int(timesteps or self.timesteps)
        if steps < 1:
            raise NIRFormatError(f"{self.source}: no number of steps: the graph has no metadata "
                                 "timesteps; give --timesteps")
        start = time.perf_counter()
        input_shape = tuple(int(s) for s in self.graph.nodes[self.input_name].input_type["input"])
        inputs, is_sequence = split_inputs(inputs.to(self.device, torch.float32), input_shape,
                                           f"{self.source}: input node {self.input_name!r}", sequence)
        if is_sequence and inputs.shape[0] != steps:
            raise NIRFormatError(f"{self.source}: the inputs have {inputs.shape[0]} steps, the run {steps}: give "
                                 f"--timesteps {inputs.shape[0]} or inputs of {steps} steps")
        batch = int(inputs.shape[1] if is_sequence else inputs.shape[0])
        # a value is (tensor, constant): constant tensors are (B, ...) and the same every step
        values: dict[str, tuple[torch.Tensor, bool]] = {}
        spikes: dict[str, torch.Tensor] = {}
        for component in self.plan:
            if len(component) > 1 or (component[0], component[0]) in self.delayed:
                self._run_cycle(component, values, steps, batch)
            else:
                self._run_node(component[0], values, steps, inputs, not is_sequence)
            for name in component:
                if isinstance(self.graph.nodes[name], SPIKING):
                    value, is_constant = values[name]
                    spikes[self.spike_names.get(name, name)] = _over_steps(value, steps) if is_constant else value
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
                            neuron_updates=float(neurons * steps * batch), energy=loihi_energy)

    def _run_node(self, name: str, values: dict, steps: int, inputs: torch.Tensor, constant: bool) -> None:
        """One node outside any cycle, over all T steps at once."""
        node, op = self.graph.nodes[name], self.ops[name]
        if name == self.input_name:
            values[name] = (inputs, constant)
            return
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

    def _zeros(self, name: str, batch: int) -> torch.Tensor:
        """Node ``name``'s output before the first step (a recurrent edge's value at step 0)."""
        shape = next(iter(self.graph.nodes[name].output_type.values()), None)
        if shape is None or any(s is None for s in np.atleast_1d(shape)):
            raise NIRFormatError(f"{self.source}: node {name!r} feeds a recurrent edge but has no output shape")
        return torch.zeros((batch, *(int(s) for s in np.atleast_1d(shape))), device=self.device)

    def _before_first_step(self, members: list[str], values: dict, batch: int) -> dict[str, torch.Tensor]:
        """Every cycle node's value before a sample's first step: 0 for the neurons (no spike
        yet), and what the other nodes compute from those zeros (a recurrent Affine gives its
        bias, as snnTorch's RSynaptic does at its first step)."""
        before: dict[str, torch.Tensor] = {}
        for name in members:
            node, op = self.graph.nodes[name], self.ops[name]
            if isinstance(node, STATEFUL):
                before[name] = self._zeros(name, batch)
                continue
            parts = []
            for source_name in self.inputs_of[name]:
                if source_name in before:
                    parts.append(before[source_name])
                elif source_name in members:
                    parts.append(self._zeros(source_name, batch))
                else:
                    value, is_constant = values[source_name]
                    parts.append(torch.zeros_like(value if is_constant else value[0]))
            total = parts[0]
            for part in parts[1:]:
                total = total + part
            before[name] = op(total) if op is not None else total
        return before

    def _run_cycle(self, members: list[str], values: dict, steps: int, batch: int) -> None:
        """A cycle, step by step: an edge that closes it carries the previous step's value."""
        states = {name: None for name in members}
        previous = self._before_first_step(members, values, batch)
        outputs: dict[str, list[torch.Tensor]] = {name: [] for name in members}
        for step in range(steps):
            current: dict[str, torch.Tensor] = {}
            for name in members:
                parts = []
                for source_name in self.inputs_of[name]:
                    if source_name not in members:
                        value, is_constant = values[source_name]
                        parts.append(value if is_constant else value[step])
                    elif (source_name, name) in self.delayed:
                        parts.append(previous[source_name])
                    else:
                        parts.append(current[source_name])
                total = parts[0]
                for part in parts[1:]:  # summed in edge order, as everywhere
                    total = total + part
                node, op = self.graph.nodes[name], self.ops[name]
                if isinstance(node, STATEFUL):
                    total, states[name] = op(total, states[name])
                elif op is not None:
                    total = op(total)
                current[name] = total
                outputs[name].append(total)
            previous = current
        for name in members:
            values[name] = (torch.stack(outputs[name]), False)

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
        the number of connections leaving its neuron, through Flatten and Scale nodes; a Scale
        fed back into an integrator (a reset by subtraction) is the neuron's own, not a synapse."""
        flat = spikes.flatten(0, 1)
        total = 0.0
        for target_name in self.successors[name]:
            node = self.graph.nodes[target_name]
            if isinstance(node, nir.Flatten):
                total += self._synops(target_name, self.ops[target_name](flat).unflatten(0, spikes.shape[:2]))
            elif isinstance(node, nir.Scale):
                if not any((target_name, after) in self.delayed and isinstance(self.graph.nodes[after], nir.I)
                           for after in self.successors[target_name]):
                    total += self._synops(target_name, spikes)
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
