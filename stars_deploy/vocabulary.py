"""The metadata words that writers and readers share: run manifests, NIR files, netx files.

One word per fact, so a reader can validate what a writer said instead of guessing:

- ``dt_s``: the integration step in seconds (NIR has no dt field of its own);
- reset ``value``: after a spike v = v_reset (NIR's own semantics; our students reset to 0);
- integrator ``euler-norse``: explicit Euler in Norse's operation order
  (``v += dt/tau (r x + v_leak - v)``, spike when ``v - v_th > 0``, then reset);
- state_init ``v_leak``: v starts at v_leak and a synaptic current at 0, every sample;
- encoding ``direct``: the normalised image is the first layer's input at every step;
- readout ``mean``: the prediction is the argmax of the output's mean over the T steps;
- layout ``NCHW``: tensors are (batch, channels, height, width), shapes carry no batch.
"""

DT_KEY = "dt_s"
RESET = "value"
INTEGRATOR = "euler-norse"
STATE_INIT = "v_leak"
ENCODING = "direct"
READOUT = "mean"
LAYOUT = "NCHW"

# Older spellings still read (the run manifests of 0.1.0 wrote "zero" and "euler").
ACCEPTED_RESETS = (RESET, "zero")
ACCEPTED_INTEGRATORS = (INTEGRATOR, "euler")
