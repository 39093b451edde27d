import io
import math

import pytest
import torch

from liqe_dist.train.weighting import (DWAWeighting, EqualWeighting, ProgressiveWeighting, WeightingConfig,
                                 build_weighting)

TASKS = ("quality", "scene", "distortion")


def run_period(w, means):
    for _ in range(w.period_steps):
        w.observe(dict(zip(TASKS, means)))


def test_dwa_by_hand():
    w = DWAWeighting(TASKS, period_steps=2, temperature=2.0)
    assert w.weights() == {"quality": 1.0, "scene": 1.0, "distortion": 1.0}
    run_period(w, [1.0, 2.0, 0.5])
    assert w.period == 1 and list(w.weights().values()) == [1.0, 1.0, 1.0]  # still equal
    run_period(w, [0.5, 2.0, 0.5])
    # w = [0.5/1, 2/2, 0.5/0.5] = [0.5, 1, 1]; lambda = 3 exp(w/2) / sum exp(w/2)
    e = [math.exp(0.25), math.exp(0.5), math.exp(0.5)]
    expected = [3 * x / sum(e) for x in e]
    assert list(w.weights().values()) == pytest.approx(expected, abs=1e-9)
    assert sum(w.weights().values()) == pytest.approx(3.0)


def test_dwa_period_means_average_the_steps():
    w = DWAWeighting(TASKS, period_steps=2)
    w.observe({"quality": 1.0, "scene": 1.0, "distortion": 1.0})
    w.observe({"quality": 3.0, "scene": 1.0, "distortion": 1.0})
    assert w.history[-1].tolist() == [2.0, 1.0, 1.0]


def test_missing_task_data_gives_neutral_ratio():
    w = DWAWeighting(TASKS, period_steps=1)
    w.observe({"quality": 1.0, "distortion": 1.0})  # no scene labels at all
    w.observe({"quality": 2.0, "distortion": 1.0})
    lam = w.weights()
    # w = [2, 1 (missing), 1]
    e = [math.exp(1.0), math.exp(0.5), math.exp(0.5)]
    assert [lam[t] for t in TASKS] == pytest.approx([3 * x / sum(e) for x in e])


def test_state_round_trip_through_weights_only_load():
    w = DWAWeighting(TASKS, period_steps=3)
    for i in range(7):
        w.observe({"quality": 1.0 / (i + 1), "scene": 0.5, "distortion": 0.2 + i * 0.01})
    buf = io.BytesIO()
    torch.save(w.state_dict(), buf)
    buf.seek(0)
    restored = DWAWeighting(TASKS, period_steps=3)
    restored.load_state_dict(torch.load(buf, weights_only=True))
    assert restored.weights() == w.weights() and restored.steps == w.steps == 1
    for i in range(7, 12):
        for x in (w, restored):
            x.observe({"quality": 1.0 / (i + 1), "scene": 0.5, "distortion": 0.2 + i * 0.01})
    assert restored.weights() == w.weights()


def test_reducer_combines_ranks():
    # two "ranks" with different losses; the reducer adds the other's statistics (an all-reduce)
    a, b = DWAWeighting(TASKS, period_steps=1), DWAWeighting(TASKS, period_steps=1)
    both = DWAWeighting(TASKS, period_steps=2)
    for la, lb in [([1.0, 2.0, 3.0], [3.0, 2.0, 1.0]), ([1.0, 1.0, 1.0], [2.0, 2.0, 0.5])]:
        a.sums += torch.tensor(la); a.counts += 1
        b.sums += torch.tensor(lb); b.counts += 1
        sa, sb = torch.stack([a.sums, a.counts]), torch.stack([b.sums, b.counts])
        a.end_period(lambda s: s + sb)
        b.end_period(lambda s: s + sa)
        both.observe(dict(zip(TASKS, la)))
        both.observe(dict(zip(TASKS, lb)))
    assert a.weights() == b.weights() == pytest.approx(both.weights())
    assert torch.equal(a.history, both.history)


def test_equal_and_progressive():
    e = EqualWeighting(TASKS, 1)
    run_period(e, [1, 2, 3])
    assert list(e.weights().values()) == [1.0, 1.0, 1.0]
    p = ProgressiveWeighting(("classification", "regression"), 1, total_periods=5,
                             easy="classification", hard="regression")
    seen = []
    for _ in range(6):
        seen.append(p.weights()["regression"])
        p.observe({"classification": 1.0, "regression": 1.0})
    assert seen == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    assert p.weights()["classification"] == 0.0


def test_build_weighting_and_config_checks():
    w = build_weighting(WeightingConfig(), TASKS, steps_per_epoch=200)
    assert isinstance(w, DWAWeighting) and w.period_steps == 200
    w = build_weighting(WeightingConfig(period_steps=10), TASKS, steps_per_epoch=200)
    assert w.period_steps == 10
    p = build_weighting(WeightingConfig(method="progressive"), ("classification", "regression"), 5, 8)
    assert p.total_periods == 8
    with pytest.raises(ValueError, match="method"):
        WeightingConfig(method="gradnorm")
    with pytest.raises(ValueError, match="temperature"):
        WeightingConfig(temperature=0)
