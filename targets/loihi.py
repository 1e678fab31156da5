r"""Bit-accurate emulator of the Loihi CUBA fixed point, reading the exported ``.net`` file.

It computes what Lava's ``PyLifModelBitAcc`` (via netx's LIFReset), ``PyConvModelFixed`` and
``PyDenseModelBitAcc`` compute, vectorised over a batch in torch int64 on CPU or CUDA.

The fixed-point semantics it reproduces (states, widths, time, input, readout) are
:data:`CONVENTIONS`, printed in every summary; the chip's numbers are in
stars_deploy/hardware/loihi.py.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
import torch.nn.functional as F

from stars_deploy.errors import DataError
from stars_deploy.exporters.netx_format import InputStage, NetxFormatError, NetxLayer, NetxNetwork, read_network
from stars_deploy.hardware.loihi import (ACTIVATION_SHIFT, BIAS_EXP, BIAS_MANT_MAX, BIAS_MANT_MIN, CONV_SUM_BITS,
                                         DECAY_SCALE, STATE_HALF_RANGE, THRESHOLD_SHIFT, WEIGHT_BITS, WEIGHT_MAX,
                                         WEIGHT_MIN)

from .energy import loihi_energy
from .record import TargetResult
from .stimulus import split_inputs
from .target import Target

NAME = "loihi"
CONVENTIONS = """\
State variables (per neuron, per step; widths as on Loihi):

- ``a_in``  synaptic input, integer. Conv: the 24-bit wrapped sum ``(x + 2^23) mod 2^24 - 2^23``
  of weight x spike; dense: ``(sum w' s) << e`` or ``>> -e`` (arithmetic) with w' and e as netx's
  ``optimize_weight_bits`` and Lava's ``clip_weights``/``truncate_weights`` make them from the
  file's weights (``netx_dense_weights``). Sums are taken in float32 when the largest sum of
  |w| into one neuron is below 2^24 (every partial sum is then an exact float32 integer) on
  the CPU, else in float64 (exact below 2^53; always on CUDA, where float32 convolutions may
  run in TF32), and rounded to int64.
- ``u``  current, 24-bit signed: ``u = sign(u) ((|u| (4096 - iDecay)) >> 12) + (a_in << 6)``
  with ``iDecay = du + 1`` (netx passes ``du = iDecay - 1``, the model adds the 1 back), then
  wrapped once: ``u > 2^23 -> u - 2^24``, ``u <= -2^23 -> u + 2^24``.
- ``v``  voltage, 24-bit signed, clipped: ``v = sign(v) ((|v| (4096 - vDecay)) >> 12) + u +
  (bias << 6)``, ``v in [-(2^23 - 1), 2^23 - 1]``.
- threshold ``vThMant << 6`` (17-bit mantissa, 0..131071); spike when ``v > vThMant << 6``
  (strict), then ``v = 0`` (u keeps its value).
- decays: 12-bit, ``iDecay`` 0..4096 (4096: u holds only this step's input), ``vDecay`` 0..4095.
- bias: 13-bit signed mantissa (-4096..4095) with the exponent 6 netx fixes.

Time. Every synaptic connection delays by one step, so on the chip layer i (0 = the input
layer) sees its first input of a sample at step i + 1, and the last layer answers D steps
late (D = layers - 1, the pipeline delay). Lava runs each sample for T + D steps with netx's
``reset_interval = T + D``: layer i resets u and v at step i + 1, so its *window* is steps
i + 1 .. i + T. The emulator computes every layer directly in window time (step t of the
window of layer i uses the spikes of step t of the window of layer i - 1, from zero state),
which is exactly the chip's window; records hold windows (T steps per layer, aligned with
the float targets), ``latency_steps = T + D`` and ``pipeline_delay_steps = D``.

Input: the off-chip first synaptic layer's output, a 13-bit integer per input-layer neuron
(:func:`input_bias_mantissa`), is that neuron's synaptic input ``a_in`` at every step
of the sample, as Lava's runner sends it (targets/lava_sim.py); for a (T, B, ...) sequence of
frames (event data) the off-chip layer runs on each frame and step t gets frame t's integers. With the exporter's
``iDecay = 4096`` this is bit for bit a bias of the same mantissa (``u = a_in << 6``).

Input of another tool's netx file (no ``stars`` group, so no off-chip stage): the user's
integers (``--inputs FILE.npz``, targets/stimulus.py), the same every step or one frame per
step. A file that starts with an input layer takes them as that layer's ``a_in``
(-32768..32767, Lava's 16-bit port; netx ignores the input layer's weight/bias transform, and
so does the emulator); a file whose first layer is a synapse takes them as binary spikes into
it, and that synapse adds one step of delay (D = layers). The steps per sample are the file's
``simulation/tSample`` or ``--timesteps``; every layer's spikes are recorded as ``layer<i>``
(the i-th layer with neurons) and the logits are the last layer's spikes.

Readout: for a non-spiking last layer the logits of step t are ``(u_t / 64 + bias) / 2^e``
(``e`` its exponent, in the file's metadata); for a spiking last layer the spikes themselves.
"""
LATENCY_NOTE = ("fixed point: one step of delay per synaptic connection; each layer's T-step window is recorded "
                "(the delay undone), the decision is read latency_steps = T + pipeline_delay_steps after the input")
FLOAT32_EXACT = 1 << 24  # integers below this add exactly in float32
INPUT_A_IN_MIN, INPUT_A_IN_MAX = -(1 << 15), (1 << 15) - 1  # Lava's LIF a_in port is int16


def netx_dense_weights(weight: np.ndarray, source: str = "dense layer") -> tuple[np.ndarray, int]:
    """(the integers Lava's Dense multiplies, the exponent it shifts their sum by) for a dense
    weight matrix as the file holds it: netx's ``optimize_weight_bits``, then Lava's
    ``clip_weights(8 bits)`` and ``truncate_weights``, reproduced step by step."""
    w = np.asarray(weight).astype(np.int64)
    max_w, min_w = int(w.max()), int(w.min())
    if max_w == min_w == 0:
        raise NetxFormatError(f"{source}: all-zero dense weights, which netx cannot load")
    if max_w > WEIGHT_MAX and min_w < 0:
        w = np.clip(w, WEIGHT_MIN, WEIGHT_MAX)
        max_w = int(w.max())
    if min_w < WEIGHT_MIN and max_w > 0:
        w = np.clip(w, WEIGHT_MIN, WEIGHT_MAX)
        min_w = int(w.min())
    if max_w < 0:
        scale, signed = -256 / min_w, 0
    elif min_w >= 0:
        scale, signed = 255 / max_w, 0
    else:
        scale, signed = min(127 / max_w if max_w > 0 else math.inf, -128 / min_w), 1
    scale_bits = math.floor(math.log2(scale)) + signed
    if scale_bits < 0:
        raise NetxFormatError(f"{source}: weights {min_w}..{max_w} make netx shift them by {scale_bits} bits; "
                              "keep dense weights within -256..254")
    n = WEIGHT_BITS
    while n > 0 and np.any(w % (1 << n)):
        n -= 1
    n -= signed
    num_weight_bits = WEIGHT_BITS - scale_bits - n
    w = w << scale_bits
    # Lava's PyDenseModelBitAcc: sign mode of the shifted weights, clip to 8 bits, truncate
    if w.min() >= 0:
        mixed, inhibitory = 0, False
    elif w.max() <= 0:
        mixed, inhibitory = 0, True
    else:
        mixed, inhibitory = 1, False
    if inhibitory:
        w = -w
    w = np.clip(w, -256 * mixed, 255)
    shift = WEIGHT_BITS - num_weight_bits + mixed
    w = (w >> shift) << shift
    if inhibitory:
        w = -w
    return w, -scale_bits


def input_current(stage: InputStage, images: torch.Tensor) -> torch.Tensor:
    """c = the off-chip first layer applied to normalised images (B, *input_shape), float64 on the CPU."""
    x = images.detach().to("cpu", torch.float64).reshape(-1, *stage.input_shape)
    weight, bias = torch.from_numpy(stage.weight), torch.from_numpy(stage.bias)
    if stage.kind == "conv":
        return F.conv2d(x, weight, bias, stage.stride, stage.padding, stage.dilation, stage.groups)
    return F.linear(x.flatten(1), weight, bias)


def input_bias_mantissa(stage: InputStage, images: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(the input layer's per-sample bias mantissa (B, ...) int64, values clipped to 13 bits).

    Shared by the emulator and the Lava runner: both inject these integers unchanged."""
    scaled = torch.round(stage.current_scale * input_current(stage, images) + stage.current_offset)
    clipped = int(((scaled < BIAS_MANT_MIN) | (scaled > BIAS_MANT_MAX)).sum())
    return scaled.clamp(BIAS_MANT_MIN, BIAS_MANT_MAX).to(torch.int64), clipped


def exact_float(weight: np.ndarray, device: torch.device = torch.device("cpu")) -> torch.dtype:
    """float32 when every partial sum of weight x {0, 1} is an integer below 2^24 in magnitude
    (the largest sum of |w| into one neuron bounds them all, in any summation order), so the
    sum is exact in float32; float64 otherwise (exact below 2^53), and always on CUDA, where
    cuDNN may compute float32 convolutions in TF32 (10-bit mantissa)."""
    if torch.device(device).type != "cpu":
        return torch.float64
    largest = np.abs(np.asarray(weight, dtype=np.float64)).reshape(len(weight), -1).sum(1).max()
    return torch.float32 if largest < FLOAT32_EXACT else torch.float64


def _decay(state: torch.Tensor, decay: int) -> torch.Tensor:
    """sign(x) * ((|x| * (4096 - decay)) >> 12): Loihi's decay, truncating toward zero (that
    is integer division of x * (4096 - decay) by 4096 rounded toward zero)."""
    if decay == DECAY_SCALE:
        return torch.zeros_like(state)
    if decay == 0:
        return state
    return torch.div(state * (DECAY_SCALE - decay), DECAY_SCALE, rounding_mode="trunc")


def cuba_run(a_in: torch.Tensor | None, bias: torch.Tensor, layer: NetxLayer, steps: int,
             shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """(spikes (T, B, ...) bool, u (T, B, ...) int64) of one CUBA layer over its window,
    from zero state; ``a_in`` (T, B, ...) int64 or None (no synaptic input), ``bias`` the
    bias mantissa broadcastable to (B, ...)."""
    neuron = layer.neuron
    i_decay = (neuron.i_decay - 1) + 1  # netx's du = iDecay - 1, the model's ds_offset = 1
    threshold = neuron.v_th_mant << THRESHOLD_SHIFT
    bias_eff = bias << BIAS_EXP
    u = torch.zeros(shape, dtype=torch.int64, device=bias.device)
    v = torch.zeros_like(u)
    spikes, currents = [], []
    for step in range(steps):
        u = _decay(u, i_decay)
        if a_in is not None:
            u = u + (a_in[step] << ACTIVATION_SHIFT)
        u = torch.where(u > STATE_HALF_RANGE, u - 2 * STATE_HALF_RANGE, u)
        u = torch.where(u <= -STATE_HALF_RANGE, u + 2 * STATE_HALF_RANGE, u)
        v = (_decay(v, neuron.v_decay) + u + bias_eff).clamp(-STATE_HALF_RANGE + 1, STATE_HALF_RANGE - 1)
        fired = v > threshold
        v = torch.where(fired, torch.zeros_like(v), v)
        spikes.append(fired)
        currents.append(u)
    return torch.stack(spikes), torch.stack(currents)


def foreign_inputs(network: NetxNetwork, inputs: torch.Tensor, steps: int, source: str,
                   sequence: bool | None = None) -> torch.Tensor:
    """(T, B, *input shape) int64: the user's inputs to another tool's netx file, checked.

    ``inputs`` is (B, *shape), the same every step, or (T, B, *shape) (targets/stimulus.py);
    integers: the input layer's a_in (-32768..32767, Lava's 16-bit port), or spikes (0/1)
    into the first synapse of a file without an input layer."""
    values, sequence = split_inputs(inputs, network.input_shape, source, sequence)
    if sequence and values.shape[0] != steps:
        raise NetxFormatError(f"{source}: the inputs have {values.shape[0]} steps, the run {steps}: give "
                              f"-T {values.shape[0]} or inputs of {steps} steps")
    if values.is_floating_point() and not bool(torch.all(values == torch.round(values))):
        raise NetxFormatError(f"{source}: the inputs of a netx file are integers (a_in or spikes); got "
                              "non-integer values")
    values = values.to(torch.int64)
    low, high = (0, 1) if network.input_synapse else (INPUT_A_IN_MIN, INPUT_A_IN_MAX)
    if values.numel() and (int(values.min()) < low or int(values.max()) > high):
        what = ("spikes into the first synapse (0 or 1)" if network.input_synapse else
                f"the input layer's a_in ({low}..{high}, Lava's 16-bit input port)")
        raise NetxFormatError(f"{source}: inputs range {int(values.min())}..{int(values.max())}; they are {what}")
    return values if sequence else values.unsqueeze(0).expand(steps, *values.shape)


def inputs_required(network: NetxNetwork, source: str) -> str | None:
    """Why a file cannot run on images (another tool's file has no input stage), or None."""
    if not network.foreign:
        return None
    what = "spikes (0/1) into its first synapse" if network.input_synapse else "its input layer's a_in (integers)"
    return (f"{source} is a netx file from another tool (no 'stars' group, no input stage): give its inputs with "
            f"--inputs FILE.npz, {what} of shape {list(network.input_shape)} per step (docs/deploy.md, foreign files)")


class LoihiEmulator:
    """Runs a ``.net`` file for T steps on a batch; returns a TargetResult (window time)."""

    def __init__(self, network: NetxNetwork, device: str | torch.device = "cpu", source: str = "network"):
        self.network, self.source, self.device = network, source, torch.device(device)
        self.metadata = network.metadata
        self.timesteps = int(self.metadata.get("timesteps") or 0)
        self.warnings = list(self.metadata.get("notes", []))  # fields of a foreign file that netx ignores
        self.inputs_required = inputs_required(network, source)
        self.synapses = [None if layer.kind == "input" else self._synapse(i, layer)
                         for i, layer in enumerate(network.layers)]

    def _synapse(self, index: int, layer: NetxLayer):
        dev = self.device
        bias = torch.as_tensor(layer.bias if layer.bias is not None else np.zeros(1, np.int64), device=dev)
        if layer.kind == "conv":
            dtype = exact_float(layer.weight, dev)
            weight = torch.as_tensor(layer.weight, dtype=dtype, device=dev)
            geometry = (layer.stride, layer.padding, layer.dilation, layer.groups)
            half = 1 << (CONV_SUM_BITS - 1)

            def conv(spikes):
                total = F.conv2d(spikes.to(dtype), weight, None, *geometry).round().to(torch.int64)
                return (total + half) % (2 * half) - half  # Lava's signed_clamp: a 24-bit wrap
            return conv, bias.view(-1, 1, 1)
        weights, exponent = netx_dense_weights(layer.weight, f"{self.source} layer {index}")
        dtype = exact_float(weights, dev)
        weight = torch.as_tensor(weights, dtype=dtype, device=dev)

        def dense(spikes):
            total = F.linear(spikes.flatten(1).to(dtype), weight).round().to(torch.int64)
            return total << exponent if exponent > 0 else total >> -exponent
        return dense, bias

    def input_sequence(self, inputs: torch.Tensor, steps: int, sequence: bool | None = None
                       ) -> tuple[torch.Tensor, int]:
        """((T, B, ...) int64 input of the first layer, inputs clipped): our files' 13-bit
        input mantissas from images, or another tool's file's inputs as given."""
        if self.network.foreign:
            return foreign_inputs(self.network, inputs, steps, self.source, sequence).to(self.device), 0
        images, is_sequence = split_inputs(inputs, self.network.input_shape, self.source, sequence)
        if images.is_floating_point() and not bool(torch.isfinite(images).all()):
            raise DataError(f"{self.source}: the input images hold NaN or Inf")
        if is_sequence:  # one frame per step (event data): the off-chip stage runs on every frame
            drive, clipped = input_bias_mantissa(self.network.input_stage, images.flatten(0, 1))
            return drive.unflatten(0, images.shape[:2]).to(self.device), clipped
        drive, clipped = input_bias_mantissa(self.network.input_stage, images)
        drive = drive.to(self.device)
        return drive.unsqueeze(0).expand(steps, *drive.shape), clipped

    @torch.no_grad()
    def run(self, images: torch.Tensor, timesteps: int | None = None, sequence: bool | None = None) -> TargetResult:
        """Run ``images`` (our files: normalised images (B, *input shape); another tool's
        file: its inputs, (B, *shape) or (T, B, *shape), ``sequence`` saying which when the
        shape alone cannot, targets/stimulus.py); spikes and logits over the T-step windows."""
        steps = int(timesteps or self.timesteps)
        if steps < 1:
            raise NetxFormatError(f"{self.source}: no number of steps in the file: give --timesteps")
        start = time.perf_counter()
        layers, meta = self.network.layers, self.metadata["layers"]
        sequence, clipped = self.input_sequence(images, steps, sequence)
        batch = sequence.shape[1]
        spikes_of, synops, spikes = [], {}, {}
        currents = None
        for index, layer in enumerate(layers):
            if self.synapses[index] is None:  # the input layer: the input is its synaptic input a_in
                a_in, bias = sequence, torch.zeros((), dtype=torch.int64, device=self.device)
            else:
                synapse, bias = self.synapses[index]
                previous = spikes_of[-1] if spikes_of else sequence
                a_in = synapse(previous.flatten(0, 1)).unflatten(0, (steps, batch))
            fired, currents = cuba_run(a_in, bias, layer, steps, (batch, *a_in.shape[2:]))
            spikes_of.append(fired)
        for index, layer_spikes in enumerate(spikes_of):
            if meta[index]["spiking"]:
                spikes[meta[index]["spike_name"]] = layer_spikes.to(torch.float32)
        for index in range(len(layers) - 1):
            if meta[index]["spiking"]:
                synops[meta[index]["spike_name"]] = fan_out_synops(layers[index + 1], spikes_of[index])
        if meta[-1]["spiking"]:
            logits_t = spikes_of[-1].flatten(2).to(torch.float32)
        else:
            logits_t = readout_logits(currents, layers[-1], meta[-1]["exponent"])
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        delay = self.network.pipeline_delay_steps
        return TargetResult(NAME, logits_t, spikes, synops, {"run_s": time.perf_counter() - start},
                            latency_steps=steps + delay, pipeline_delay_steps=delay,
                            neuron_updates=float(on_chip_neurons(self.network) * (steps + delay) * batch),
                            input_clipped=clipped, energy=loihi_energy)


def conventions() -> str:
    """The fixed-point conventions (states, widths, time), as one paragraph for users."""
    return " ".join(CONVENTIONS.split())


def readout_logits(currents: torch.Tensor, layer: NetxLayer, exponent: int) -> torch.Tensor:
    """(T, B, K) float logits of a non-spiking readout from its u: (u / 64 + bias) / 2^e."""
    bias = torch.as_tensor(layer.bias, device=currents.device)
    return ((currents >> ACTIVATION_SHIFT) + bias).to(torch.float64).div(2.0 ** exponent).to(torch.float32)


def on_chip_neurons(network: NetxNetwork) -> int:
    return sum(int(np.prod(layer.shape)) for layer in network.layers)


def fan_out_synops(target: NetxLayer, spikes: torch.Tensor) -> float:
    """Synaptic events the (T, B, ...) ``spikes`` cause in the next layer ``target``."""
    flat = spikes.flatten(0, 1).to(torch.float64)  # float64: exact counts, no TF32 on CUDA
    if target.kind == "dense":
        return float(flat.sum()) * int(target.weight.shape[0])
    if target.groups != 1:
        return float(flat.sum()) * int(target.weight[0].size)
    ones = torch.ones((1, 1, *target.weight.shape[2:]), dtype=torch.float64, device=flat.device)
    hits = F.conv2d(flat.sum(1, keepdim=True), ones, None, target.stride, target.padding, target.dilation)
    return float(hits.sum()) * int(target.weight.shape[0])


def load_emulator(path, device: str = "cpu", timesteps: int | None = None) -> LoihiEmulator:
    """Read a .net file and prepare the emulator for it (``timesteps``: the file's unless given)."""
    emulator = LoihiEmulator(read_network(path), device=device, source=str(path))
    emulator.timesteps = int(timesteps or emulator.timesteps)
    return emulator


TARGET = Target(
    NAME, export="loihi", summary="bit-accurate emulator of the .net file's Loihi fixed point (CPU or CUDA, batched)",
    load=lambda path, options: load_emulator(path, options.device, options.timesteps),
    latency_note=LATENCY_NOTE, conventions=conventions(), energy=loihi_energy)
