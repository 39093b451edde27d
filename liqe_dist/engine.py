"""A DeepSpeed engine around LIQE: AdamW with cosine annealing, ZeRO stage from the config.

The optimiser is torch's AdamW handed to DeepSpeed (no C++ op to build on a CPU), over the
trainable parameters only (the logit scale is frozen by default). bf16 on GPUs, fp32 on CPUs
(DeepSpeed refuses fp16 on CPUs). The process group must exist already (Ray Train, torchrun,
or the tests' spawned ranks): DeepSpeed reuses it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn


@dataclass(frozen=True)
class OptimConfig:
    """AdamW + cosine annealing (the reference recipe: lr 5e-6, weight decay 1e-3)."""

    lr: float = 5e-6
    weight_decay: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    schedule: Literal["cosine", "constant"] = "cosine"
    min_lr: float = 0.0
    zero_stage: int = 1
    gradient_clipping: float = 0.0
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU

    def __post_init__(self) -> None:
        if self.zero_stage not in (0, 1, 2):
            raise ValueError(f"optim.zero_stage must be 0, 1 or 2, got {self.zero_stage}")
        if self.lr <= 0:
            raise ValueError(f"optim.lr must be > 0, got {self.lr}")


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


def build_optimizer(model: nn.Module, cfg: OptimConfig, total_steps: int):
    """Torch AdamW over the trainable parameters and its (cosine) schedule."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)
    if cfg.schedule == "cosine":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, total_steps), eta_min=cfg.min_lr)
    else:
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    return opt, sched


def build_engine(model: nn.Module, cfg: OptimConfig, total_steps: int):
    """(engine, optimizer, scheduler); the engine's ``backward``/``step`` replace torch's."""
    on_gpu = torch.cuda.is_available()
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if on_gpu else "cpu")
    import deepspeed

    opt, sched = build_optimizer(model, cfg, total_steps)
    engine, opt, _, sched = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched,
                                                 config=ds_config(cfg, on_gpu))
    return engine, opt, sched
