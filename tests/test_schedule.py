"""Learning-rate schedules: the paper's one cosine and the reference code's per-epoch cycles."""

import math

import pytest
import torch

from liqe_dist.dist.engine import OptimConfig, build_optimizer, cosine_cycles_factor


def reference_epoch_lrs(lr: float, epochs: int, t_max: int = 5) -> list[float]:
    """The lr each epoch of train_unique_clip_weight.py trains at, by running its own code: a
    CosineAnnealingLR(T_max=5) stepped after every epoch, stepped once more before an epoch
    whose lr is 0 (``if optimizer...['lr'] == 0: scheduler.step()``)."""
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=lr, weight_decay=0.001)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=t_max)
    lrs = []
    for _ in range(epochs):
        if opt.state_dict()["param_groups"][0]["lr"] == 0:
            scheduler.step()
        lrs.append(opt.param_groups[0]["lr"])
        scheduler.step()
    return lrs


def test_cosine_cycles_equal_the_reference_code_over_80_epochs():
    expected = reference_epoch_lrs(5e-6, 80)
    got = [5e-6 * cosine_cycles_factor(e, 5) for e in range(80)]
    assert got == pytest.approx(expected, rel=1e-9, abs=1e-18)
    assert min(got) > 0  # no epoch trains at lr 0
    # the values the issue measured: epochs 0, 5, 10, 40, 79
    assert [round(got[e], 8) for e in (0, 5, 10, 40, 79)] == [5.0e-6, 4.8e-7, 4.52e-6, 4.8e-7, 3.27e-6]


def test_cosine_cycles_step_per_step_inside_the_optimiser():
    model = torch.nn.Linear(2, 1)
    opt, sched = build_optimizer(model, OptimConfig(lr=5e-6, schedule="cosine_cycles"), total_steps=30 * 4,
                                 steps_per_epoch=4)
    seen = []
    for _ in range(30 * 4):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    per_epoch = reference_epoch_lrs(5e-6, 30)
    for step, lr in enumerate(seen):
        assert lr == pytest.approx(per_epoch[step // 4], rel=1e-9), step
    # the scheduler state a checkpoint keeps holds plain numbers (weights_only loads it)
    state = sched.state_dict()
    assert state["lr_lambdas"][0] == {"steps_per_epoch": 4, "period": 5, "min_ratio": 0.0}


def test_cosine_is_one_annealing_over_the_run_and_min_lr_holds():
    model = torch.nn.Linear(2, 1)
    opt, sched = build_optimizer(model, OptimConfig(lr=1e-3, min_lr=1e-4, schedule="cosine"), total_steps=10)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([1e-4 + 0.9e-3 * (1 + math.cos(math.pi * t / 10)) / 2 for t in range(10)])
    # with a floor the cycles never reach 0, so no step is skipped
    assert cosine_cycles_factor(5, 5, 0.1) == pytest.approx(0.1)


def test_cycles_need_the_epoch_length_and_recipes_pick_the_schedule():
    from liqe_dist.config import ConfigError, from_dict
    from liqe_dist.train.config import TrainConfig

    with pytest.raises(ValueError, match="steps per epoch"):
        build_optimizer(torch.nn.Linear(2, 1), OptimConfig(schedule="cosine_cycles"), total_steps=10)
    data = {"datasets": [{"name": "a", "shards": "shards/a"}]}
    assert from_dict(TrainConfig, data).optim.schedule == "cosine"
    reference = {**data, "model": {"loss": {"recipe": "reference"}}}
    assert from_dict(TrainConfig, reference).optim.schedule == "cosine_cycles"
    pmt = {**data, "model": {"family": "pmt_iqa"}, "crops": {"size": 224}}
    assert from_dict(TrainConfig, pmt).optim.schedule == "step"  # PMT-IQA's: lr / 10 every 6 epochs
    both = {**reference, "optim": {"schedule": "cosine"}}
    assert from_dict(TrainConfig, both).optim.schedule == "cosine"  # a knob set explicitly wins
    with pytest.raises(ConfigError, match="optim.schedule: expected one of"):
        from_dict(TrainConfig, {**data, "optim": {"schedule": "linear"}})
