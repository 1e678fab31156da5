r"""NIR graph -> Loihi CUBA fixed point -> lava-dl netx network (``netx_format``).

Takes any NIR graph of this shape (ours or another tool's; it starts from the graph, never
from a student object)::

    Input -> [Flatten] -> Conv2d|Affine|Linear -> LIF            (input layer, see below)
          -> ([Flatten] -> Conv2d|Affine|Linear -> LIF)*          (hidden layers, on chip)
          -> [Flatten] -> Affine|Linear -> Output                 (non-spiking readout)
             or the last LIF -> Output                            (spiking output)

and refuses, naming the node and what to change, anything netx cannot run: pooling, merges
and skips (a node with several inputs or outputs), recurrence (cycles), other node types,
per-neuron time constants or thresholds, a reset value other than 0, and values that do not
fit the hardware fields.

Fixed point (the equations of Lava's ``PyLifModelBitAcc``; ``targets/loihi.py`` documents
every state's width). A NIR LIF integrated by Euler at dt is

.. math:: v_t = (1 - a) v_{t-1} + a (r (W z_{t-1} + b) + v_{leak}),\quad a = dt/\tau

and Loihi's CUBA neuron with ``iDecay = 4096`` (u holds only the current step's input) is

.. math:: V_t = V_{t-1} (4096 - vDecay) / 4096 + (w z) \ll 6 + bias \ll 6

so with ``vDecay = round(4096 a)``, ``a_q = vDecay / 4096`` and one exponent ``e`` per layer
(V = v 2^(e+6)): ``w = 2 round(a_q r W 2^e / 2)`` (8-bit mantissa, even weights in
[-256, 254], the netx convention), ``bias = round(a_q (r b + v_leak) 2^e)`` (13-bit),
``vThMant = round(v_th 2^e)`` (17-bit). ``e`` is the largest integer for which the weights
fit, the threshold and bias mantissas fit, u cannot wrap (64 times the largest sum of
same-sign weights into one neuron, plus the bias, below 2^23) and v cannot clip (that drive
times 4096 / vDecay below 2^23). The readout (Affine -> Output) uses a_q = 1,
``iDecay = 4096``, ``vDecay = 4095`` and the largest threshold: it never spikes and the
logits of step t are ``(u_t / 64 + bias) / 2^e``.

Direct encoding (the choice): the first synaptic layer runs off-chip (float64, once per
sample, ``netx_format.input_bias_mantissa``) and its output becomes a 13-bit integer per
input-layer neuron, injected as that neuron's synaptic input every step (equal, bit for bit,
to a bias of the same mantissa since iDecay = 4096). Its exponent is chosen from the largest
current any input in the valid range can give (normalised pixels of [0, 1] images, from the
metadata's normalisation, else inputs in [0, 1]), so valid inputs are never clipped.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import nir
import numpy as np
import torch
import torch.nn.functional as F

from stars_deploy import vocabulary
from stars_deploy.errors import StarsDeployError

from stars_deploy.hardware.loihi import (ACTIVATION_SHIFT, BIAS_MANT_MAX, DECAY_SCALE, I_DECAY_NONE,
                                         STATE_HALF_RANGE, STATE_LIMIT, THRESHOLD_MANT_MAX, V_DECAY_MAX,
                                         WEIGHT_BITS, WEIGHT_MAX, WEIGHT_MIN)

from stars_deploy.layout import export_dir
from stars_deploy.units import text_table

from .netx_format import NETX_FORMAT, InputStage, NetxLayer, NetxNetwork, NeuronConfig, conv_output_shape, write_network
from .nir_export import export_nir
from .nir_format import graph_layer_table
from .nir_format import decode_metadata, read_nir
from .records import file_entries, merge_record
from .registry import ExportOptions, export_kind

READOUT_V_DECAY = V_DECAY_MAX  # the readout keeps (almost) all of v: it never spikes anyway
DEFAULT_INPUT_RANGE = (0.0, 1.0)
SYNAPSES = (nir.Conv2d, nir.Affine, nir.Linear)
POOLS = (nir.SumPool2d, nir.AvgPool2d)
NEURONS = (nir.LIF, nir.IF)
LINEAR = SYNAPSES + POOLS + (nir.Flatten,)
POOL_ADVICE = ("netx cannot run pooling on its own: put it next to a convolution (or before Flatten -> Affine), "
               "which absorbs it, or use a strided convolution instead")
ADVICE = {
    nir.SumPool2d: POOL_ADVICE,
    nir.AvgPool2d: POOL_ADVICE,
    nir.CubaLIF: "only current-free LIF neurons are lowered (a synaptic current with a bias has no netx "
                 "equivalent): export a student with tau_syn_steps=None",
    nir.LI: "netx has no leaky-integrator output: end the graph with an Affine readout",
    nir.Delay: "netx files hold no delays",
}


class LoihiExportError(StarsDeployError):
    """A NIR graph or value that the Loihi/netx lowering cannot represent."""


def _uniform(source: str, name: str, field: str, values) -> float:
    array = np.asarray(values, dtype=np.float64)
    if not np.all(np.isfinite(array)):
        raise LoihiExportError(f"{source}: node {name!r} has a NaN or Inf {field}; give finite values")
    if array.size and not np.all(array == array.flat[0]):
        raise LoihiExportError(f"{source}: node {name!r} has per-neuron {field} ({array.min():g}..{array.max():g}); "
                               "netx holds one value per layer: make it uniform")
    return float(array.flat[0]) if array.size else 0.0


def _chain(graph: nir.NIRGraph, source: str) -> list[str]:
    """Node names from Input to Output; refuses merges, skips and cycles, naming the node."""
    inputs_of, successors = defaultdict(list), defaultdict(list)
    for a, b in graph.edges:
        inputs_of[b].append(a)
        successors[a].append(b)

    def reaches(start: str, goal: str) -> bool:
        stack, seen = [start], set()
        while stack:
            node = stack.pop()
            if node == goal:
                return True
            if node not in seen:
                seen.add(node)
                stack.extend(successors[node])
        return False

    for name in graph.nodes:
        if any(reaches(nxt, name) for nxt in successors[name]):
            raise LoihiExportError(f"{source}: node {name!r} is on a cycle (recurrence); netx files here are "
                                   "feed-forward only: remove the recurrent connection")
        if len(inputs_of[name]) > 1:
            raise LoihiExportError(f"{source}: node {name!r} sums {len(inputs_of[name])} inputs "
                                   f"({', '.join(inputs_of[name])}), a skip or merge connection; netx runs "
                                   "feed-forward chains only: use the convnet student family")
        if len(successors[name]) > 1:
            raise LoihiExportError(f"{source}: node {name!r} feeds {len(successors[name])} nodes "
                                   f"({', '.join(successors[name])}), a skip connection; netx runs "
                                   "feed-forward chains only: use the convnet student family")
    starts = [n for n, node in graph.nodes.items() if isinstance(node, nir.Input)]
    if len(starts) != 1:
        raise LoihiExportError(f"{source}: the Loihi lowering needs exactly one Input node, found {len(starts)}")
    order, name = [], starts[0]
    while True:
        if name in order:
            raise LoihiExportError(f"{source}: node {name!r} is on a cycle (recurrence); netx files here "
                                   "are feed-forward only: remove the recurrent connection")
        order.append(name)
        if not successors[name]:
            break
        name = successors[name][0]
    if not isinstance(graph.nodes[order[-1]], nir.Output):
        raise LoihiExportError(f"{source}: the chain from the Input ends at {order[-1]!r}, not an Output node")
    missing = sorted(set(graph.nodes) - set(order))
    if missing:
        raise LoihiExportError(f"{source}: nodes {', '.join(missing)} are not on the Input->Output chain "
                               "(recurrent or dangling connections are not supported)")
    return order


def _check_type(source: str, name: str, node) -> None:
    allowed = (nir.Input, nir.Output) + LINEAR + NEURONS
    if not isinstance(node, allowed):
        advice = ADVICE.get(type(node), "supported: Input, Conv2d, Affine, Linear, Flatten, SumPool2d, AvgPool2d, "
                                        "LIF, IF, Output")
        raise LoihiExportError(f"{source}: node {name!r} is a {type(node).__name__}: {advice}")


def _pair(value) -> tuple[int, int]:
    return tuple(int(x) for x in np.broadcast_to(np.atleast_1d(np.asarray(value)), (2,)))


def _finite(source: str, name: str, field: str, array) -> np.ndarray:
    array = np.asarray(array, dtype=np.float64)
    if not np.all(np.isfinite(array)):
        bad = int((~np.isfinite(array)).sum())
        raise LoihiExportError(f"{source}: node {name!r} has {bad} NaN or Inf {field} value(s); a chip holds "
                               "finite integers only: retrain or repair the weights")
    return array


def _synapse(source: str, name: str, node, in_shape: tuple[int, ...]) -> dict:
    """Float64 weight, bias and geometry of a Conv2d/Affine/Linear node on an ``in_shape`` input."""
    weight = _finite(source, name, "weight", node.weight)
    if isinstance(node, nir.Conv2d):
        if isinstance(node.padding, str):
            raise LoihiExportError(f"{source}: node {name!r} uses padding {node.padding!r}; give integer padding")
        bias = np.zeros(weight.shape[0]) if node.bias is None else _finite(source, name, "bias", node.bias)
        syn = dict(kind="conv", weight=weight, bias=np.broadcast_to(bias, (weight.shape[0],)).copy(),
                   stride=_pair(node.stride), padding=_pair(node.padding), dilation=_pair(node.dilation),
                   groups=int(node.groups), in_shape=in_shape)
        if len(in_shape) != 3 or weight.shape[1] * syn["groups"] != in_shape[0]:
            raise LoihiExportError(f"{source}: node {name!r}: weight {list(weight.shape)} does not take the "
                                   f"{list(in_shape)} input it is given")
        syn["out_shape"] = conv_output_shape(in_shape, weight.shape[0], weight.shape[2:], syn["stride"],
                                             syn["padding"], syn["dilation"])
        return syn
    bias = _finite(source, name, "bias", node.bias) if isinstance(node, nir.Affine) else np.zeros(weight.shape[0])
    if weight.ndim != 2 or weight.shape[1] != int(np.prod(in_shape)):
        raise LoihiExportError(f"{source}: node {name!r}: weight {list(weight.shape)} does not take the "
                               f"{int(np.prod(in_shape))} inputs it is given")
    return dict(kind="dense", weight=weight, bias=np.broadcast_to(bias, (weight.shape[0],)).copy(),
                in_shape=in_shape, out_shape=(weight.shape[0],))


def _pool(source: str, name: str, node, in_shape: tuple[int, ...]) -> dict:
    """A pool as a fold: kernel = stride (tiling), no padding, the input divisible by it."""
    kernel, stride, padding = _pair(node.kernel_size), _pair(node.stride), _pair(node.padding)
    kind = type(node).__name__
    if len(in_shape) != 3:
        raise LoihiExportError(f"{source}: node {name!r} is a {kind} on a {list(in_shape)} input; "
                               f"{POOL_ADVICE}")
    if kernel != stride or any(padding) or in_shape[1] % kernel[0] or in_shape[2] % kernel[1]:
        raise LoihiExportError(f"{source}: node {name!r} is a {kind} {kernel[0]}x{kernel[1]}/{stride[0]}, padding "
                               f"{list(padding)} on {list(in_shape)}: only non-overlapping pools that tile the input "
                               f"fold exactly into a convolution; {POOL_ADVICE}")
    weight = 1.0 if isinstance(node, nir.SumPool2d) else 1.0 / (kernel[0] * kernel[1])
    return dict(kernel=kernel, weight=weight, kind=kind,
                out_shape=(in_shape[0], in_shape[1] // kernel[0], in_shape[2] // kernel[1]))


def _fold_pool_before(syn: dict, pool: dict, pool_in: tuple[int, ...]) -> str:
    """Pool (kernel k = stride) then ``syn``, as one synapse on the pool's input: for a conv,
    kernel K k, stride s k, padding p k and W'[m] = w_pool W[m // k]; for Flatten -> dense,
    each weight repeated over the k x k inputs its pooled input summed."""
    kh, kw = pool["kernel"]
    if syn["kind"] == "conv":
        if syn["dilation"] != (1, 1):
            raise LoihiExportError("a dilated convolution after a pool does not fold")
        syn["weight"] = np.repeat(np.repeat(syn["weight"], kh, axis=2), kw, axis=3) * pool["weight"]
        syn["stride"] = (syn["stride"][0] * kh, syn["stride"][1] * kw)
        syn["padding"] = (syn["padding"][0] * kh, syn["padding"][1] * kw)
        what = (f"into a {syn['weight'].shape[2]}x{syn['weight'].shape[3]}/{syn['stride'][0]} convolution, padding "
                f"{syn['padding'][0]}")
    else:
        channels, height, width = pool["out_shape"]
        weight = syn["weight"].reshape(-1, channels, height, width)
        weight = np.repeat(np.repeat(weight, kh, axis=2), kw, axis=3) * pool["weight"]
        syn["weight"] = weight.reshape(weight.shape[0], -1)
        what = f"into the dense weights ({syn['weight'].shape[1]} inputs)"
    syn["in_shape"] = pool_in
    return what


def _fold_pool_after(syn: dict, pool: dict) -> str:
    """``syn`` (a convolution) then a pool, as one convolution: taps m = s a + k of the pool's
    offsets a, stride s k, the same padding; the bias summed over the pool window."""
    if syn["kind"] != "conv" or syn["dilation"] != (1, 1):
        raise LoihiExportError("only an undilated convolution absorbs the pool after it")
    (kh, kw), (sh, sw) = pool["kernel"], syn["stride"]
    out, inp, height, width = syn["weight"].shape
    folded = np.zeros((out, inp, sh * (kh - 1) + height, sw * (kw - 1) + width))
    for a in range(kh):
        for b in range(kw):
            folded[:, :, sh * a:sh * a + height, sw * b:sw * b + width] += syn["weight"]
    syn["weight"] = folded * pool["weight"]
    syn["bias"] = syn["bias"] * pool["weight"] * kh * kw
    syn["stride"] = (sh * kh, sw * kw)
    return f"into a {folded.shape[2]}x{folded.shape[3]}/{syn['stride'][0]} convolution"


def _segment(graph: nir.NIRGraph, names: list[str], in_shape: tuple[int, ...], source: str
             ) -> tuple[dict, bool, list[dict]]:
    """The linear nodes between two neurons as one synapse: (synapse, flatten before?, rewrites).

    Pools fold into the convolution (or the Flatten -> dense) next to them, exactly (the same
    linear map, in float64); everything is quantised once, afterwards."""
    kinds = [graph.nodes[n] for n in names]
    synapses = [i for i, node in enumerate(kinds) if isinstance(node, SYNAPSES)]
    if len(synapses) != 1:
        where = names[synapses[1]] if len(synapses) > 1 else (names[0] if names else "the neuron")
        if not synapses and names and isinstance(kinds[0], POOLS):
            raise LoihiExportError(f"{source}: node {names[0]!r} is a {type(kinds[0]).__name__} with no convolution "
                                   f"or dense synapse beside it: {POOL_ADVICE}")
        raise LoihiExportError(f"{source}: node {where!r}: the lowering needs exactly one Conv2d, Affine or Linear "
                               "synapse between two neurons (two synapses in a row are not lowered: fold them, or "
                               "put a neuron between them)")
    index = synapses[0]
    shapes, shape = [], in_shape
    for name, node in zip(names[:index], kinds[:index]):
        shapes.append(shape)
        if isinstance(node, nir.Flatten):
            shape = (int(np.prod(shape)),)
        else:
            shape = _pool(source, name, node, shape)["out_shape"]
    flatten = any(isinstance(node, nir.Flatten) for node in kinds)
    if any(isinstance(node, nir.Flatten) for node in kinds[index:]) or (
            flatten and not isinstance(kinds[index - 1], nir.Flatten)):
        raise LoihiExportError(f"{source}: node {names[index]!r}: a Flatten is only lowered right before a dense "
                               "synapse")
    syn = _synapse(source, names[index], kinds[index], shape)
    rewrites = []
    for position in range(index - 1, -1, -1):
        node = kinds[position]
        if isinstance(node, nir.Flatten):
            continue
        pool = _pool(source, names[position], node, shapes[position])
        try:
            what = _fold_pool_before(syn, pool, shapes[position])
        except LoihiExportError as exc:
            raise LoihiExportError(f"{source}: node {names[position]!r} is a {pool['kind']}: {exc}; "
                                   f"{POOL_ADVICE}") from None
        rewrites.append({"node": names[position], "rewrite": f"{pool['kind']} {pool['kernel'][0]}x{pool['kernel'][1]} "
                                                             f"folded into {names[index]!r} {what} (exact)"})
    out_shape = syn["out_shape"]
    for name, node in zip(names[index + 1:], kinds[index + 1:]):
        pool = _pool(source, name, node, out_shape)
        try:
            what = _fold_pool_after(syn, pool)
        except LoihiExportError as exc:
            raise LoihiExportError(f"{source}: node {name!r} is a {pool['kind']}: {exc}; {POOL_ADVICE}") from None
        out_shape = pool["out_shape"]
        rewrites.append({"node": name, "rewrite": f"{pool['kind']} {pool['kernel'][0]}x{pool['kernel'][1]} folded "
                                                  f"into {names[index]!r} {what} (exact)"})
    if syn["kind"] == "conv":
        folded = conv_output_shape(syn["in_shape"], syn["weight"].shape[0], syn["weight"].shape[2:], syn["stride"],
                                   syn["padding"], syn["dilation"])
        if folded != out_shape:
            raise LoihiExportError(f"{source}: node {names[index]!r}: folding its pools gives {list(folded)}, not "
                                   f"{list(out_shape)}; {POOL_ADVICE}")
    syn["out_shape"] = out_shape
    return syn, flatten, rewrites


def _neuron(source: str, name: str, node, dt_s: float, timesteps: int) -> dict:
    """One neuron node as Loihi's CUBA neuron with iDecay 4096. The fields used downstream:
    v_decay (12-bit), gain (input -> v per step), bias_leak (the constant drive of v_leak),
    v_th, growth (how many steps of drive v can accumulate: 4096 / vDecay, or T without leak),
    and the rewrite shown in the report."""
    if isinstance(node, nir.IF):
        # NIR IF: dv/dt = r I, Euler v += dt r x: no leak, v starts at 0
        v_reset = _uniform(source, name, "v_reset", node.v_reset)
        if v_reset != 0:
            raise LoihiExportError(f"{source}: node {name!r} resets to {v_reset:g}; Loihi resets v to 0: "
                                   "use v_reset = 0")
        r = _uniform(source, name, "r", node.r)
        return dict(v_decay=0, a_q=1.0, ratio=0.0, gain=dt_s * r, bias_gain=dt_s * r, bias_leak=0.0, v_leak=0.0,
                    v_th=_uniform(source, name, "v_threshold", node.v_threshold), growth=timesteps,
                    rewrite=f"IF -> CUBA LIF with vDecay 0 (no leak), input gain dt r = {dt_s * r:g}")
    tau = _uniform(source, name, "tau", node.tau)
    v_reset = _uniform(source, name, "v_reset", node.v_reset)
    v_leak = _uniform(source, name, "v_leak", node.v_leak)
    v_th = _uniform(source, name, "v_threshold", node.v_threshold)
    rewrite = None
    if v_leak != 0:
        # Loihi's v starts at 0 and resets to 0. In w = v - v_leak the LIF is w += a (r x - w),
        # starting at 0 (v = v_leak, as the reference starts) and resetting to v_reset - v_leak:
        # exact when that is 0, with the threshold v_th - v_leak
        if v_reset != v_leak:
            raise LoihiExportError(
                f"{source}: node {name!r} starts at v_leak = {v_leak:g} and resets to {v_reset:g}; Loihi starts v "
                "at 0 and resets it to 0, and no shift of v makes both 0 unless v_reset = v_leak: use v_leak = 0 or "
                "v_reset = v_leak")
        v_th, rewrite = v_th - v_leak, f"v shifted by v_leak = {v_leak:g} (w = v - v_leak starts and resets at 0)"
    elif v_reset != 0:
        raise LoihiExportError(f"{source}: node {name!r} resets to {v_reset:g}; Loihi resets v to 0: use v_reset = 0")
    ratio = dt_s / tau if tau > 0 else math.inf
    v_decay = round(DECAY_SCALE * ratio) if math.isfinite(ratio) else 0
    if not 0 < v_decay <= V_DECAY_MAX:
        raise LoihiExportError(f"{source}: node {name!r}: dt/tau = {ratio:g} gives vDecay {v_decay}, outside the "
                               f"12-bit range 1..{V_DECAY_MAX}; at dt = {dt_s:g} s tau must lie in "
                               f"({dt_s * DECAY_SCALE / (V_DECAY_MAX + 0.5):.4g} s, {dt_s * 2 * DECAY_SCALE:.3g} s]: "
                               "change tau or --dt-s")
    a_q, r = v_decay / DECAY_SCALE, _uniform(source, name, "r", node.r)
    return dict(v_decay=v_decay, a_q=a_q, ratio=ratio, gain=a_q * r, bias_gain=a_q * r, v_leak=v_leak,
                bias_leak=0.0, v_th=v_th, growth=DECAY_SCALE / v_decay, rewrite=rewrite)


def _same_sign_drive(weight: np.ndarray) -> np.ndarray:
    """Per output neuron/channel: the larger of the sums of positive and of negative weights
    (the most one step's input can add to u, all presynaptic neurons spiking)."""
    flat = weight.reshape(weight.shape[0], -1)
    return np.maximum(np.clip(flat, 0, None).sum(1), -np.clip(flat, None, 0).sum(1))


def _quantize(source: str, name: str, weight: np.ndarray, bias: np.ndarray, v_th: float | None,
              growth: float) -> tuple[int, np.ndarray, np.ndarray, int, dict]:
    """(exponent, int weights, int bias, vThMant, report row) for float weights already in
    units of v per step; v_th None for the never-spiking readout; ``growth``: how many steps
    of drive v can accumulate (4096 / vDecay with a leak, T without)."""
    largest = float(np.abs(weight).max())
    if largest == 0:
        raise LoihiExportError(f"{source}: node {name!r} has all-zero weights, which netx cannot load; remove the layer")
    limits = [math.floor(math.log2(WEIGHT_MAX / largest))]
    if v_th is not None:
        if v_th <= 0:
            raise LoihiExportError(f"{source}: node {name!r} has threshold {v_th:g}; Loihi needs a positive threshold")
        limits.append(math.floor(math.log2(THRESHOLD_MANT_MAX / v_th)))
    if np.abs(bias).max() > 0:
        limits.append(math.floor(math.log2(BIAS_MANT_MAX / float(np.abs(bias).max()))))
    exponent = min(limits)
    v_limit = STATE_LIMIT if v_th is not None else THRESHOLD_MANT_MAX << ACTIVATION_SHIFT
    while True:
        scale = 2.0 ** exponent
        mantissa = np.round(weight * scale / 2)
        clipped = int(((mantissa > WEIGHT_MAX // 2) | (mantissa < WEIGHT_MIN // 2)).sum())
        weight_int = 2 * np.clip(mantissa, WEIGHT_MIN // 2, WEIGHT_MAX // 2).astype(np.int64)
        bias_int = np.round(bias * scale).astype(np.int64)
        u_max = float((_same_sign_drive(weight_int) << ACTIVATION_SHIFT).max())
        drive = float(((_same_sign_drive(weight_int) + np.abs(bias_int)) << ACTIVATION_SHIFT).max())
        v_max = drive * growth
        if u_max < STATE_HALF_RANGE and v_max < v_limit:
            break
        exponent -= 1
    v_th_mant = THRESHOLD_MANT_MAX if v_th is None else int(round(v_th * scale))
    if v_th is not None and v_th_mant < 1:
        raise LoihiExportError(f"{source}: node {name!r}: the threshold {v_th:g} rounds to 0 at the weight exponent "
                               f"{exponent}; its weights are too large for its threshold: rescale them together")
    error = weight_int / scale - weight
    report = {"layer": name, "exponent": exponent, "scale": scale, "weight_bits": WEIGHT_BITS,
              "weights": int(weight.size), "weights_clipped": clipped,
              "weight_max_abs_error": float(np.abs(error).max()),
              "weight_rms_relative_error": float(np.sqrt((error**2).mean() / max((weight**2).mean(), 1e-300))),
              "bias_max_abs_error": float(np.abs(bias_int / scale - bias).max()) if bias.size else 0.0,
              "threshold_mant": v_th_mant,
              "threshold_error": 0.0 if v_th is None else float(v_th_mant / scale - v_th),
              "u_max": u_max, "v_bound": v_max}
    return exponent, weight_int, bias_int, v_th_mant, report


def _input_bounds(stage: dict, shape: tuple[int, ...], low: np.ndarray, high: np.ndarray) -> float:
    """The largest |c| the off-chip first layer can output for any input between low and high."""
    w = torch.from_numpy(stage["weight"])
    lo = torch.from_numpy(np.broadcast_to(low, shape).copy())[None]
    hi = torch.from_numpy(np.broadcast_to(high, shape).copy())[None]
    pos, neg = w.clamp(min=0), w.clamp(max=0)
    if stage["kind"] == "conv":
        def apply(weight, x):
            return F.conv2d(x, weight, None, stage["stride"], stage["padding"], stage["dilation"], stage["groups"])
        # padded positions are 0 in the real input too, so they add nothing to either bound
        top, bottom = apply(pos, hi) + apply(neg, lo), apply(pos, lo) + apply(neg, hi)
        bias = torch.from_numpy(stage["bias"]).view(1, -1, 1, 1)
    else:
        top, bottom = F.linear(hi.flatten(1), pos) + F.linear(lo.flatten(1), neg), \
            F.linear(lo.flatten(1), pos) + F.linear(hi.flatten(1), neg)
        bias = torch.from_numpy(stage["bias"])[None]
    return float(torch.maximum((top + bias).abs(), (bottom + bias).abs()).max())


def _input_range(metadata: dict, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    normalization = metadata.get("normalization")
    if not normalization:
        return np.array(DEFAULT_INPUT_RANGE[0]), np.array(DEFAULT_INPUT_RANGE[1])
    mean, std = np.asarray(normalization["mean"], np.float64), np.asarray(normalization["std"], np.float64)
    view = (-1,) + (1,) * (len(shape) - 1)
    low, high = (0 - mean) / std, (1 - mean) / std
    return np.minimum(low, high).reshape(view), np.maximum(low, high).reshape(view)


def _settings(metadata: dict, dt_s: float | None, timesteps: int | None, source: str) -> tuple[float, int]:
    """(dt in seconds, steps per sample): given, else from the graph's metadata."""
    try:
        dt_s = float(dt_s if dt_s is not None else metadata.get(vocabulary.DT_KEY, math.nan))
        timesteps = int(timesteps or metadata.get("timesteps", 0))
    except (TypeError, ValueError):
        raise LoihiExportError(f"{source}: metadata dt_s or timesteps is not a number: give --dt-s and "
                               "--timesteps") from None
    if not math.isfinite(dt_s) or dt_s <= 0:
        raise LoihiExportError(f"{source}: the graph has no metadata dt_s: give the integration step (--dt-s SECONDS)")
    if timesteps < 1:
        raise LoihiExportError(f"{source}: the graph has no metadata timesteps: give --timesteps")
    if metadata.get("reset") not in (None, *vocabulary.ACCEPTED_RESETS):
        raise LoihiExportError(f"{source}: metadata reset = {metadata['reset']!r}; Loihi resets v to 0")
    return dt_s, timesteps


def _stages(graph: nir.NIRGraph, body: list[str], source: str) -> list[tuple[list[str], str | None]]:
    """The chain between Input and Output as (linear nodes, neuron or None) stages; the last
    stage without a neuron is the non-spiking readout."""
    stages, current = [], []
    for name in body:
        if isinstance(graph.nodes[name], NEURONS):
            stages.append((current, name))
            current = []
        else:
            current.append(name)
    if current:
        stages.append((current, None))
    if not stages or stages[0][1] is None:
        raise LoihiExportError(f"{source}: the lowering needs a first synapse -> LIF layer (the input layer)")
    return stages


def _input_layer(graph: nir.NIRGraph, stage: tuple, metadata: dict, input_shape: tuple[int, ...],
                 dt_s: float, timesteps: int, source: str) -> tuple[NetxLayer, InputStage, dict, int, list[dict]]:
    """The input layer: its synapse runs off-chip, its neuron on chip with the current as bias.
    Returns (layer, off-chip stage, report row, exponent, rewrites)."""
    names, first_neuron = stage
    syn, _, rewrites = _segment(graph, names, input_shape, source)
    lif = _neuron(source, first_neuron, graph.nodes[first_neuron], dt_s, timesteps)
    low, high = _input_range(metadata, input_shape)
    c_max = _input_bounds(syn, input_shape, low, high)
    drive = abs(lif["gain"]) * c_max + abs(lif["bias_leak"])
    if lif["v_th"] <= 0:
        raise LoihiExportError(f"{source}: node {first_neuron!r} has threshold {lif['v_th']:g}; Loihi needs a "
                               "positive threshold")
    limits = [math.floor(math.log2(THRESHOLD_MANT_MAX / lif["v_th"]))]
    if drive > 0:
        limits.append(math.floor(math.log2(BIAS_MANT_MAX / drive)))
    exponent = min(limits)
    while drive * 2.0**exponent * 2**ACTIVATION_SHIFT * lif["growth"] >= STATE_LIMIT:
        exponent -= 1  # v would clip before the leak balances the bias
    scale = 2.0 ** exponent
    v_th_mant = int(round(lif["v_th"] * scale))
    input_stage = InputStage(syn["kind"], syn["weight"], syn["bias"], lif["gain"] * scale,
                             lif["bias_leak"] * scale, input_shape,
                             syn.get("stride", (1, 1)), syn.get("padding", (0, 0)),
                             syn.get("dilation", (1, 1)), syn.get("groups", 1))
    layer = NetxLayer("input", syn["out_shape"], NeuronConfig(I_DECAY_NONE, lif["v_decay"], v_th_mant))
    synapse_name = next(n for n in names if isinstance(graph.nodes[n], SYNAPSES))
    row = {"layer": first_neuron, "kind": "input", "exponent": exponent, "scale": scale,
           "input_current_max": c_max, "bias_mant_max": drive * scale, "bias_resolution": 1 / scale,
           "threshold_mant": v_th_mant, "threshold_error": v_th_mant / scale - lif["v_th"],
           "v_decay": lif["v_decay"], "v_decay_exact": DECAY_SCALE * lif["ratio"], "decay_error": lif["a_q"] - lif["ratio"],
           "note": f"synapse {synapse_name!r} runs off-chip; its output is the 13-bit bias of the input layer"}
    if lif["rewrite"]:
        rewrites.append({"node": first_neuron, "rewrite": lif["rewrite"]})
    return layer, input_stage, row, exponent, rewrites


def _chip_layer(graph: nir.NIRGraph, stage: tuple, in_shape: tuple[int, ...], dt_s: float, timesteps: int,
                spike_names: dict, source: str) -> tuple[NetxLayer, dict, dict, list[dict]]:
    """One on-chip layer (a LIF/IF layer, or the never-spiking readout): (layer, report row,
    metadata, rewrites)."""
    names, neuron_name = stage
    syn, flatten, rewrites = _segment(graph, names, in_shape, source)
    synapse_name = next(n for n in names if isinstance(graph.nodes[n], SYNAPSES))
    if neuron_name is None:  # the non-spiking readout
        if syn["kind"] != "dense":
            raise LoihiExportError(f"{source}: readout {synapse_name!r} is a convolution; end with an Affine readout")
        exponent, weight, bias, v_th_mant, row = _quantize(source, synapse_name, syn["weight"], syn["bias"],
                                                           None, DECAY_SCALE / READOUT_V_DECAY)
        neuron = NeuronConfig(I_DECAY_NONE, READOUT_V_DECAY, v_th_mant)
        row.update(kind="readout", v_decay=READOUT_V_DECAY, v_decay_exact=float(READOUT_V_DECAY), decay_error=0.0,
                   note="never spikes; logits_t = (u_t / 64 + bias) / scale")
        meta = {"spike_name": None, "exponent": exponent, "spiking": False, "node": synapse_name}
    else:
        lif = _neuron(source, neuron_name, graph.nodes[neuron_name], dt_s, timesteps)
        bias_float = lif["bias_gain"] * syn["bias"] + lif["bias_leak"]
        exponent, weight, bias, v_th_mant, row = _quantize(source, neuron_name, lif["gain"] * syn["weight"],
                                                           bias_float, lif["v_th"], lif["growth"])
        neuron = NeuronConfig(I_DECAY_NONE, lif["v_decay"], v_th_mant)
        row.update(kind=syn["kind"], v_decay=lif["v_decay"], v_decay_exact=DECAY_SCALE * lif["ratio"],
                   decay_error=lif["a_q"] - lif["ratio"])
        meta = {"spike_name": spike_names.get(neuron_name, neuron_name), "exponent": exponent, "spiking": True,
                "node": neuron_name}
        if lif["rewrite"]:
            rewrites.append({"node": neuron_name, "rewrite": lif["rewrite"]})
    layer = NetxLayer(syn["kind"], syn["out_shape"], neuron, weight, bias, flatten_before=flatten)
    if syn["kind"] == "conv":
        layer.stride, layer.padding, layer.dilation, layer.groups = (syn["stride"], syn["padding"],
                                                                    syn["dilation"], syn["groups"])
    return layer, row, meta, rewrites


def lower_nir(graph: nir.NIRGraph, dt_s: float | None = None, timesteps: int | None = None,
              source: str = "graph") -> tuple[NetxNetwork, list[dict]]:
    """The netx network and the per-layer quantisation report for a NIR graph (the rewrites
    it made, pools folded and IF as LIF, are in ``network.metadata["rewrites"]``)."""
    metadata = decode_metadata(graph.metadata if isinstance(graph.metadata, dict) else {})
    dt_s, timesteps = _settings(metadata, dt_s, timesteps, source)
    order = _chain(graph, source)
    for name in order:
        _check_type(source, name, graph.nodes[name])
    spike_names = dict(metadata.get("spike_layers", {}))
    input_shape = tuple(int(s) for s in graph.nodes[order[0]].input_type["input"])
    stages = _stages(graph, order[1:-1], source)
    layer, input_stage, row, exponent, rewrites = _input_layer(graph, stages[0], metadata, input_shape, dt_s,
                                                               timesteps, source)
    layers, report = [layer], [row]
    layer_meta = [{"spike_name": spike_names.get(stages[0][1], stages[0][1]), "exponent": exponent,
                   "spiking": True, "node": stages[0][1]}]
    for stage in stages[1:]:
        layer, row, meta, more = _chip_layer(graph, stage, layers[-1].shape, dt_s, timesteps, spike_names, source)
        layers.append(layer)
        report.append(row)
        layer_meta.append(meta)
        rewrites += more
    readout = "spikes" if layer_meta[-1]["spiking"] else "current"
    meta = {"format": NETX_FORMAT, vocabulary.DT_KEY: dt_s, "timesteps": timesteps, "readout": readout,
            "pipeline_delay_steps": len(layers) - 1, "layers": layer_meta,
            "normalization": metadata.get("normalization"), "class_names": metadata.get("class_names"),
            "source": source, "rewrites": rewrites}
    return NetxNetwork(layers, input_stage, meta), report


def netx_table(network: NetxNetwork) -> list[dict]:
    """One row per netx layer: index, type, shape, kernel/stride, neuron fields, exponent."""
    rows = []
    for index, (layer, meta) in enumerate(zip(network.layers, network.metadata["layers"])):
        row = {"index": index, "type": layer.kind, "shape": list(layer.shape), "flatten_before": layer.flatten_before,
               "iDecay": layer.neuron.i_decay, "vDecay": layer.neuron.v_decay, "vThMant": layer.neuron.v_th_mant,
               "exponent": meta["exponent"], "spike_name": meta["spike_name"], "node": meta.get("node")}
        if layer.kind == "conv":
            row.update(kernel=list(layer.weight.shape[2:]), stride=list(layer.stride), padding=list(layer.padding))
        rows.append(row)
    return rows


def export_loihi(path: Path, options: ExportOptions = ExportOptions()) -> dict:
    """``export --target loihi``: lower a NIR graph to Loihi fixed point and write it as a netx
    .net file. ``path`` is a run directory (its student is exported to export/student.nir
    first, and the lowering reads that file) or any .nir file (written beside it as FILE.net,
    with export.json in the same folder). Returns the export.json payload."""
    path = Path(path)
    if path.is_dir():
        export_nir(path)
        nir_file = export_dir(path) / export_kind("nir").file
    elif path.suffix == export_kind("nir").suffix:
        nir_file = path
    else:
        raise LoihiExportError(f"{path}: give a run directory or a .nir file")
    graph = read_nir(nir_file)
    network, report = lower_nir(graph, dt_s=options.dt_s, timesteps=options.timesteps, source=str(nir_file))
    net_file = nir_file.with_suffix(export_kind("loihi").suffix)
    write_network(net_file, network)
    layers = graph_layer_table(graph)
    meta = network.metadata
    payload = {
        "target": "loihi", "source": str(nir_file), "files": file_entries([net_file]),
        "input_shape": list(network.input_stage.input_shape), "output_shape": list(network.layers[-1].shape),
        "timesteps": meta["timesteps"], "dt_s": meta["dt_s"], "readout": meta["readout"],
        "pipeline_delay_steps": network.pipeline_delay_steps, "parameters": sum(row["parameters"] for row in layers),
        "layers": layers, "netx_layers": netx_table(network), "quantization": report,
        "rewrites": meta["rewrites"],
    }
    if path.is_dir():
        payload["run_dir"] = str(path)
    return merge_record(nir_file.parent, payload)


def report_lines(payload: dict) -> list[str]:
    """The quantisation report and the netx layer table of an export.json payload, as text."""
    lines = []
    if payload.get("rewrites"):
        lines.append("rewrites (each the same linear map or neuron, quantised once afterwards):")
        lines += text_table(("node", "rewrite"), [(r["node"], r["rewrite"]) for r in payload["rewrites"]])
    lines.append("quantisation (per layer; scale = 2^exponent mantissa units per unit of v; "
                 "vDecay = round(4096 dt/tau)):")
    lines += text_table(
        ("layer", "kind", "exp", "vThMant", "vDecay", "clipped", "w rms rel err", "w max err", "bias max err",
         "4096 dt/tau"),
        [(r["layer"], r["kind"], r["exponent"], r["threshold_mant"], r["v_decay"], r.get("weights_clipped", "-"),
          f"{r['weight_rms_relative_error']:.4f}" if "weight_rms_relative_error" in r else "off-chip input",
          f"{r['weight_max_abs_error']:.2e}" if "weight_max_abs_error" in r else "",
          f"{r['bias_max_abs_error']:.2e}" if "bias_max_abs_error" in r else f"step {r['bias_resolution']:.2e}",
          f"{r['v_decay_exact']:.4g}" if "v_decay_exact" in r else "")
         for r in payload["quantization"]])
    for r in payload["quantization"]:
        if "v_decay_exact" in r and r["kind"] != "readout" and r["v_decay"] != r["v_decay_exact"]:
            lines.append(f"vDecay of {r['layer']} rounded: {r['v_decay']} for 4096 dt/tau = {r['v_decay_exact']:.6g} "
                         f"(v keeps {1 - r['v_decay'] / 4096:.6f} per step instead of "
                         f"{1 - r['v_decay_exact'] / 4096:.6f})")
    lines.append("netx layers:")
    lines += text_table(
        ("#", "type", "shape", "kernel/stride", "iDecay", "vDecay", "vThMant", "spikes"),
        [(r["index"], ("flatten+" if r["flatten_before"] else "") + r["type"], "x".join(map(str, r["shape"])),
          f"{r['kernel']}/{r['stride']}" if "kernel" in r else "", r["iDecay"], r["vDecay"], r["vThMant"],
          r["spike_name"] or "(readout: u)") for r in payload["netx_layers"]])
    lines.append(f"pipeline delay: {payload['pipeline_delay_steps']} steps (latency T + delay = "
                 f"{payload['timesteps'] + payload['pipeline_delay_steps']} steps)")
    return lines
