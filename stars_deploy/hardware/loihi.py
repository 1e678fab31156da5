r"""Intel Loihi's CUBA neuron in fixed point, as Lava's bit-accurate models compute it.

Per neuron and step (``PyLifModelBitAcc``; netx passes ``du = iDecay - 1`` and the model adds
the 1 back):

.. math::
    u_t &= \mathrm{sign}(u)\,\big((|u_{t-1}| (4096 - iDecay)) \gg 12\big) + (a_{in} \ll 6),
           \quad \text{wrapped to 24 bits} \\
    v_t &= \mathrm{sign}(v)\,\big((|v_{t-1}| (4096 - vDecay)) \gg 12\big) + u_t + (bias \ll 6),
           \quad \text{clipped to 24 bits} \\
    z_t &= [v_t > vThMant \ll 6], \quad v_t \leftarrow 0 \text{ where } z_t

Weights are 8-bit mantissas (netx writes even values in [-256, 254]) with one exponent per
layer; every synaptic connection delays by one step.

Energy per operation, Loihi 1: Davies et al., "Loihi: A Neuromorphic Manycore Processor with
On-Chip Learning", IEEE Micro 38(1), 2018, Table 1. Loihi 2 has no published primary
per-operation figure, so it is only estimated from a figure the user supplies.
"""

# ---- state and parameter widths --------------------------------------------------------
WEIGHT_BITS = 8  # signed weight mantissa; netx stores 2 * mantissa
WEIGHT_MAX, WEIGHT_MIN = 254, -256  # the even weights netx files hold
DECAY_SHIFT = 12
DECAY_SCALE = 1 << DECAY_SHIFT  # 4096: a state keeps (4096 - decay) / 4096 per step
V_DECAY_MAX = DECAY_SCALE - 1  # 12-bit vDecay, 0..4095
I_DECAY_MAX = DECAY_SCALE  # iDecay 0..4096; 4096: u holds only this step's input
I_DECAY_NONE = I_DECAY_MAX
THRESHOLD_MANT_BITS = 17
THRESHOLD_MANT_MAX = (1 << THRESHOLD_MANT_BITS) - 1  # vThMant 0..131071
ACTIVATION_SHIFT = 6  # synaptic input a_in is << 6 into u
THRESHOLD_SHIFT = 6  # the threshold is vThMant << 6
BIAS_EXP = 6  # netx fixes the bias exponent: bias << 6
BIAS_MANT_BITS = 13
BIAS_MANT_MIN, BIAS_MANT_MAX = -(1 << (BIAS_MANT_BITS - 1)), (1 << (BIAS_MANT_BITS - 1)) - 1  # -4096..4095
STATE_BITS = 24  # u and v are 24-bit signed
STATE_HALF_RANGE = 1 << (STATE_BITS - 1)  # 2^23
STATE_LIMIT = STATE_HALF_RANGE - 1  # the largest |v|: v is clipped to +-(2^23 - 1)
CONV_SUM_BITS = 24  # Lava's fixed-point conv wraps its output to 24 bits
REFRACTORY_DELAY_STEPS = 1  # netx's refDelay for a CUBA neuron that resets and runs on at once
GRADED_SPIKE = 0  # binary spikes

# ---- energy per operation (Loihi 1) ----------------------------------------------------
LOIHI1_SYNOP_PJ = 23.6  # Davies et al. 2018, Table 1: synaptic spike op
LOIHI1_SPIKE_ROUTING_PJ = 3.5  # same table: a spike routed across one tile hop
LOIHI1_NEURON_UPDATE_PJ = 81.0  # same table: an active neuron update
LOIHI1_SOURCE = "Davies et al., Loihi: a neuromorphic manycore processor, IEEE Micro 38(1), 2018, Table 1"
