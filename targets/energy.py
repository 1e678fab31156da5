"""Energy models: Joules per sample from a record's counts (synaptic ops, spikes, neuron updates).

A target names its model in its registry record (or none). Loihi 1 uses the published
per-operation table (stars_deploy/hardware/loihi.py, Davies et al. 2018); Loihi 2 only with
a per-operation energy the caller supplies, since no primary figure is published.

An energy model takes the per-sample counts (``synops_per_sample``, ``spikes_per_sample``,
``neuron_updates_per_sample``) and returns a dict whose ``j`` is its estimate in joules per
sample and ``model`` its name; anything else it returns is kept in the summary as it is.
"""

from __future__ import annotations

from stars_deploy.hardware.loihi import (LOIHI1_NEURON_UPDATE_PJ, LOIHI1_SOURCE, LOIHI1_SPIKE_ROUTING_PJ,
                                         LOIHI1_SYNOP_PJ)

PJ = 1e-12


def loihi_energy(counts: dict, loihi2_pj_per_op: float | None = None) -> dict:
    """Joules per sample for ``counts`` (``synops_per_sample``, ``spikes_per_sample``,
    ``neuron_updates_per_sample``): Loihi 1 from its published table; Loihi 2 only when the
    caller supplies an energy per operation (pJ per synaptic op or neuron update)."""
    synops, spikes = counts["synops_per_sample"], counts["spikes_per_sample"]
    updates = counts["neuron_updates_per_sample"]
    loihi1 = (synops * LOIHI1_SYNOP_PJ + spikes * LOIHI1_SPIKE_ROUTING_PJ + updates * LOIHI1_NEURON_UPDATE_PJ) * PJ
    return {"j": loihi1, "model": "Loihi 1", "loihi1_j": loihi1, "loihi1_source": LOIHI1_SOURCE,
            "loihi1_pj_per_op": {"synop": LOIHI1_SYNOP_PJ, "spike_routing": LOIHI1_SPIKE_ROUTING_PJ,
                                 "neuron_update": LOIHI1_NEURON_UPDATE_PJ},
            "loihi2_j": None if loihi2_pj_per_op is None else (synops + updates) * loihi2_pj_per_op * PJ,
            "loihi2_pj_per_op": loihi2_pj_per_op}
