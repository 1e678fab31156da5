"""The per-layer and per-step views that the report draws, computed once in targets/record.py."""

import pytest
import torch

from stars_deploy.targets.energy import loihi_energy
from stars_deploy.targets.record import Tally, TargetResult, summarize
from stars_deploy.units import of, percent, si, steps_and_time


def _result(delay: int = 0) -> TargetResult:
    generator = torch.Generator().manual_seed(0)
    spikes = {"a": (torch.rand(5, 6, 4, 3, 3, generator=generator) > 0.6).float(),
              "b": (torch.rand(5, 6, 7, generator=generator) > 0.7).float()}
    spikes["b"][:, 2] = 0  # one sample never fires in layer b
    synops = {"a": float(spikes["a"].sum()) * 7, "b": float(spikes["b"].sum()) * 3}  # fan-outs 7 and 3
    return TargetResult("x", torch.randn(5, 6, 3, generator=generator), spikes, synops, latency_steps=5 + delay,
                        pipeline_delay_steps=delay, neuron_updates=float((36 + 7) * (5 + delay) * 6),
                        energy=loihi_energy)


def test_energy_by_step_ends_at_the_total_and_layers_add_up():
    summary = summarize(_result(delay=1), torch.tensor([0, 1, 2, 0, 1, 2]))
    total = summary["energy_per_sample"]["j"]
    assert summary["energy_by_step"][-1] == pytest.approx(total, rel=1e-12)
    assert all(a < b for a, b in zip(summary["energy_by_step"], summary["energy_by_step"][1:]))
    assert sum(summary["energy_per_layer"].values()) + summary["energy_neuron_updates"] == pytest.approx(total)
    assert summary["energy_per_layer"]["a"] == pytest.approx(
        (summary["synops_per_layer"]["a"] * 23.6 + summary["spikes_per_layer"]["a"] * 3.5) * 1e-12)


def test_first_spike_steps_count_the_pipeline_position_and_skip_silent_samples():
    result = _result(delay=1)
    summary = summarize(result)
    fired = result.spikes["b"].flatten(2).sum(2) > 0
    expected = [int(fired[:, b].float().argmax()) + 1 + 1 for b in range(6) if fired[:, b].any()]
    assert summary["first_spike_step_per_layer"]["b"] == pytest.approx(sum(expected) / len(expected))
    assert len(expected) == 5  # the silent sample is left out


def _split(result: TargetResult, parts: slice) -> TargetResult:
    """The samples ``parts`` of a record, with synops and neuron updates in proportion."""
    share = len(range(result.samples)[parts]) / result.samples
    return TargetResult(result.target, result.logits_t[:, parts], {k: v[:, parts] for k, v in result.spikes.items()},
                        {name: float(result.spikes[name][:, parts].sum()) * (7 if name == "a" else 3)
                         for name in result.spikes}, {"run": 1.0}, result.latency_steps,
                        result.pipeline_delay_steps, result.neuron_updates * share, 0, result.energy)


def _close(a, b) -> bool:
    """Equal, floats to 1e-9 relative, through nested dicts and lists."""
    if isinstance(b, dict):
        return isinstance(a, dict) and a.keys() == b.keys() and all(_close(a[k], b[k]) for k in b)
    if isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b))
    return a == pytest.approx(b, rel=1e-9) if isinstance(b, float) else a == b


def test_a_tally_of_batches_summarizes_like_one_record_of_them_all():
    # simulate keeps per-layer sums of each batch, never every spike: the summary must not change
    result, labels = _result(delay=1), torch.tensor([0, 1, 2, 0, 1, 2])
    reference = TargetResult("ref", result.logits_t.flip(1), {k: v.flip(1) for k, v in result.spikes.items()},
                             result.synops, latency_steps=6, pipeline_delay_steps=1)
    parts = [slice(0, 2), slice(2, 5), slice(5, 6)]
    tally = Tally.of(_split(result, parts[0]), _split(reference, parts[0]))
    for part in parts[1:]:
        tally = tally + Tally.of(_split(result, part), _split(reference, part))
    whole, batched = summarize(result, labels, reference), summarize(tally, labels)
    assert batched.pop("timings_s") == {"run": 3.0}
    whole.pop("timings_s")
    assert batched.keys() == whole.keys()
    for key, value in whole.items():
        assert _close(batched[key], value), key
    assert batched["spike_mismatches"] > 0 and batched["agreement"] < 1


def test_confusion_matrix_counts_true_against_predicted():
    result = _result()
    labels = torch.tensor([2, 2, 0, 1, 1, 0])
    summary = summarize(result, labels)
    matrix = torch.tensor(summary["confusion_matrix"])
    predictions = result.predictions
    assert matrix.sum() == 6 and int(matrix.diagonal().sum()) == int((predictions == labels).sum())
    for true, predicted in zip(labels.tolist(), predictions.tolist()):
        assert matrix[true, predicted] >= 1


def test_units_read_as_people_read_them():
    assert si(9.994915e-05, "J") == "99.9 µJ" and si(7.45231e-06, "J") == "7.45 µJ" and si(0.0021, "s") == "2.10 ms"
    assert of(24132, 1433600) == "24,132 of 1,433,600 (1.7 %)"
    assert percent(0.00222224) == "0.2 %" and percent(None) == "n/a"
    assert steps_and_time(9, 1e-3) == "9 steps (9.00 ms at dt = 1.00 ms)"
