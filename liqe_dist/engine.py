"""A DeepSpeed engine around LIQE: AdamW with cosine annealing, ZeRO stage from the config.

The optimiser is torch's AdamW handed to DeepSpeed (no C++ op to build on a CPU), over the
trainable parameters only (the logit scale is frozen by default). bf16 on GPUs, fp32 on CPUs
(DeepSpeed refuses fp16 on CPUs). The process group must exist already (Ray Train, torchrun,
or the tests' spawned ranks): DeepSpeed reuses it.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn


@dataclass(frozen=True)
class OptimConfig:
    """AdamW + cosine annealing (the reference recipe: lr 5e-6, weight decay 1e-3).

    ``schedule``: ``cosine`` anneals once from ``lr`` to ``min_lr`` over the whole run, step by
    step; ``cosine_cycles`` is the reference code's (see :func:`cosine_cycles_factor`), with
    ``cycle_epochs`` its ``T_max``; ``constant``. None: the one ``loss.recipe`` names (paper:
    cosine, reference: cosine_cycles), or cosine outside a training config.
    """

    lr: float = 5e-6
    weight_decay: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    schedule: Literal["cosine", "cosine_cycles", "constant"] | None = None
    cycle_epochs: int = 5
    min_lr: float = 0.0
    zero_stage: int = 1
    gradient_clipping: float = 0.0
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU

    def __post_init__(self) -> None:
        if self.zero_stage not in (0, 1, 2):
            raise ValueError(f"optim.zero_stage must be 0, 1 or 2, got {self.zero_stage}")
        if self.lr <= 0:
            raise ValueError(f"optim.lr must be > 0, got {self.lr}")
        if not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"optim.min_lr must be in [0, lr], got {self.min_lr}")
        if self.cycle_epochs < 1:
            raise ValueError(f"optim.cycle_epochs must be >= 1, got {self.cycle_epochs}")


def cosine_cycles_factor(epoch: int, period: int, min_ratio: float = 0.0) -> float:
    """lr / base lr during epoch ``epoch`` (0-based) of the reference code's schedule.

    The reference (``train_unique_clip_weight.py``) builds ``CosineAnnealingLR(T_max=5)``, steps
    it once per epoch and never resets it, so the lr falls to its minimum over ``period`` epochs
    and climbs back over the next ``period`` (a cosine of period ``2 * period``). When the lr is
    exactly 0 at the start of an epoch (``min_ratio`` 0), it steps once more before training
    (``if lr == 0: scheduler.step()``): no epoch trains at lr 0, and every trough moves the
    position one further. With lr 5e-6: epochs 0, 5, 10, 40, 79 train at 5.0e-6, 4.8e-7, 4.5e-6,
    4.8e-7, 3.3e-6.
    """
    t = 0  # the scheduler's position (its last_epoch) when epoch ``epoch`` trains
    for e in range(epoch + 1):
        if min_ratio == 0 and t % (2 * period) == period:
            t += 1
        if e < epoch:
            t += 1
    return min_ratio + (1.0 - min_ratio) * (1.0 + math.cos(math.pi * t / period)) / 2.0


def ds_config(cfg: OptimConfig, on_gpu: bool) -> dict:
    """The DeepSpeed JSON config for ``cfg``."""
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and on_gpu)
    return {
        "train_micro_batch_size_per_gpu": 1,  # bookkeeping only: batches are assembled by the stream
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": cfg.zero_stage},
        "bf16": {"enabled": bf16},
        "fp16": {"enabled": False},
        "gradient_clipping": cfg.gradient_clipping,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


class _CosineCycles:
    """Per-step lr multiplier of :func:`cosine_cycles_factor` (LambdaLR keeps a callable
    object's attributes in its state dict, so checkpoints record the schedule's parameters)."""

    def __init__(self, steps_per_epoch: int, period: int, min_ratio: float):
        self.steps_per_epoch, self.period, self.min_ratio = steps_per_epoch, period, min_ratio

    def __call__(self, step: int) -> float:
        return cosine_cycles_factor(step // self.steps_per_epoch, self.period, self.min_ratio)


def build_optimizer(model: nn.Module, cfg: OptimConfig, total_steps: int, steps_per_epoch: int | None = None):
    """Torch AdamW over the trainable parameters and its schedule, stepped once per step.
    ``cosine_cycles`` needs ``steps_per_epoch`` (its lr changes at epoch boundaries only)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)
    schedule = cfg.schedule or "cosine"
    if schedule == "cosine":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, total_steps), eta_min=cfg.min_lr)
    elif schedule == "cosine_cycles":
        if not steps_per_epoch:
            raise ValueError("optim.schedule cosine_cycles needs the number of steps per epoch")
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, _CosineCycles(steps_per_epoch, cfg.cycle_epochs, cfg.min_lr / cfg.lr))
    else:
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    return opt, sched


def build_engine(model: nn.Module, cfg: OptimConfig, total_steps: int, steps_per_epoch: int | None = None):
    """(engine, optimizer, scheduler); the engine's ``backward``/``step`` replace torch's."""
    on_gpu = torch.cuda.is_available()
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if on_gpu else "cpu")
    import deepspeed

    opt, sched = build_optimizer(model, cfg, total_steps, steps_per_epoch)
    engine, opt, _, sched = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched,
                                                 config=ds_config(cfg, on_gpu))
    return engine, opt, sched
