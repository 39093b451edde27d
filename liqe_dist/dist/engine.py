"""A DeepSpeed engine around a model of any family: AdamW (or Adam) with a schedule, ZeRO stage from the config.

The optimiser is torch's AdamW (or Adam) handed to DeepSpeed (no C++ op to build on a CPU), over the
trainable parameters only (the logit scale is frozen by default). The config's ``use_gpu``
picks the device and DeepSpeed's accelerator, never what the machine happens to have.
Precision ``auto``: bf16 on GPUs that have it, fp32 elsewhere (DeepSpeed refuses fp16 on
CPUs); bf16 works on CPUs too (the tests use it). Under bf16 DeepSpeed keeps float32 master
weights and optimizer state, and gradients are all-reduced in float32
(``communication_data_type``): bf16 sums over 16 ranks would add 16 roundings of 2^-9.
The process group must exist already (Ray Train, torchrun, or the tests' spawned ranks):
DeepSpeed reuses it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal

import torch
from torch import nn

from liqe_dist.hardware import resolve_precision, select_accelerator, training_device


@dataclass(frozen=True)
class OptimConfig:
    """AdamW + cosine annealing (the reference recipe: lr 5e-6, weight decay 1e-3).

    ``schedule``: ``cosine`` anneals once from ``lr`` to ``min_lr`` over the whole run, step by
    step; ``cosine_cycles`` is the reference code's (see :func:`cosine_cycles_factor`), with
    ``cycle_epochs`` its ``T_max``; ``step`` multiplies the lr by ``step_gamma`` every
    ``step_epochs`` epochs (PMT-IQA's: / 10 every 6), the first time after ``step_epochs +
    step_delay_epochs`` epochs (:func:`step_factor`); ``constant``.
    ``reset_each_epoch``: the optimiser's state (Adam's moments and step count) is cleared at
    every epoch's end, as the PMT-IQA public code re-creates its Adam every epoch. None: the model family's
    (LIQE: the one ``model.loss.recipe`` names, paper: cosine, reference: cosine_cycles;
    PMT-IQA: step), or cosine outside a training config.

    ``optimizer``: ``adamw`` (decoupled weight decay, LIQE's) or ``adam`` (weight decay as an L2
    term in the gradient: torch's ``Adam(weight_decay=...)``, PMT-IQA's).
    """

    optimizer: Literal["adamw", "adam"] = "adamw"
    lr: float = 5e-6
    weight_decay: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    schedule: Literal["cosine", "cosine_cycles", "step", "constant"] | None = None
    cycle_epochs: int = 5
    step_epochs: int = 6
    step_gamma: float = 0.1
    step_delay_epochs: int | None = None  # None: the family's (PMT-IQA reference: 1, else 0)
    reset_each_epoch: bool | None = None  # a fresh optimiser state every epoch (None: the family's)
    min_lr: float = 0.0
    zero_stage: int = 1
    gradient_clipping: float = 0.0
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 on GPUs with bf16, fp32 on CPUs

    def __post_init__(self) -> None:
        if self.zero_stage not in (0, 1, 2):
            raise ValueError(f"optim.zero_stage must be 0, 1 or 2, got {self.zero_stage}")
        if self.lr <= 0:
            raise ValueError(f"optim.lr must be > 0, got {self.lr}")
        if not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"optim.min_lr must be in [0, lr], got {self.min_lr}")
        if self.cycle_epochs < 1:
            raise ValueError(f"optim.cycle_epochs must be >= 1, got {self.cycle_epochs}")
        if self.step_epochs < 1 or not 0 < self.step_gamma <= 1:
            raise ValueError(f"optim.step_epochs must be >= 1 and optim.step_gamma in (0, 1], got "
                             f"{self.step_epochs} and {self.step_gamma}")
        if self.step_delay_epochs is not None and self.step_delay_epochs < 0:
            raise ValueError(f"optim.step_delay_epochs must be >= 0, got {self.step_delay_epochs}")
        if self.optimizer not in ("adamw", "adam"):
            raise ValueError(f"optim.optimizer must be adamw or adam, got {self.optimizer!r}")


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


def training_precision(cfg: OptimConfig, use_gpu: bool, cuda_bf16: bool | None = None) -> str:
    """``fp32`` or ``bf16``: ``auto`` is bf16 only on GPUs that compute it natively (CPU
    training stays fp32, whose results the tests pin; bf16 on a CPU is asked for by name)."""
    if cfg.precision != "auto":
        return cfg.precision
    return resolve_precision("auto", "cuda" if use_gpu else "cpu", cpu_flags=frozenset(), cuda_bf16=cuda_bf16)


def ds_config(cfg: OptimConfig, use_gpu: bool, cuda_bf16: bool | None = None) -> dict:
    """The DeepSpeed JSON config for ``cfg`` on a GPU (``use_gpu``) or CPU run."""
    bf16 = training_precision(cfg, use_gpu, cuda_bf16) == "bf16"
    return {
        "train_micro_batch_size_per_gpu": 1,  # bookkeeping only: batches are assembled by the stream
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": cfg.zero_stage},
        "bf16": {"enabled": bf16},
        "fp16": {"enabled": False},
        "communication_data_type": "fp32",  # gradient all-reduce / reduce-scatter in float32
        "gradient_clipping": cfg.gradient_clipping,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def step_factor(epoch: int, step_epochs: int, gamma: float, delay: int = 0) -> float:
    """lr / base lr during epoch ``epoch`` (0-based) of the step schedule:
    ``gamma ** (max(epoch - delay, 0) // step_epochs)``. With ``delay`` 0 it is torch's StepLR
    stepped per epoch (epochs 0-5 at the base lr, 6-11 at a tenth); with 1 it is the PMT-IQA
    public code's ``lr / 10 ** (t // 6)`` set after epoch t (epochs 0-6 at the base lr, 7-12
    at a tenth, 13-18 at a hundredth)."""
    return gamma ** (max(epoch - delay, 0) // step_epochs)


class _DelayedSteps:
    """Per-step lr multiplier of :func:`step_factor` with a delay (a callable object: LambdaLR
    keeps its attributes in the checkpoint)."""

    def __init__(self, steps_per_epoch: int, step_epochs: int, gamma: float, delay: int):
        self.steps_per_epoch, self.step_epochs, self.gamma, self.delay = steps_per_epoch, step_epochs, gamma, delay

    def __call__(self, step: int) -> float:
        return step_factor(step // self.steps_per_epoch, self.step_epochs, self.gamma, self.delay)


def torch_optimizer(optimizer) -> torch.optim.Optimizer:
    """The torch optimiser inside ``optimizer`` (itself, or DeepSpeed's ZeRO / bf16 wrapper's)."""
    inner = optimizer
    while not isinstance(inner, torch.optim.Optimizer) and hasattr(inner, "optimizer"):
        inner = inner.optimizer
    if not isinstance(inner, torch.optim.Optimizer):
        raise TypeError(f"{type(optimizer).__name__} wraps no torch optimiser")
    return inner


def reset_optimizer_state(optimizer) -> None:
    """Forget the optimiser's state (Adam: moments and step count) as if it were new; the
    parameters, lr and param groups stay. ``optimizer``: torch's, or DeepSpeed's wrapper of it
    (ZeRO, bf16), whose torch optimiser re-creates the state lazily at its next step."""
    torch_optimizer(optimizer).state.clear()


class _CosineCycles:
    """Per-step lr multiplier of :func:`cosine_cycles_factor` (LambdaLR keeps a callable
    object's attributes in its state dict, so checkpoints record the schedule's parameters)."""

    def __init__(self, steps_per_epoch: int, period: int, min_ratio: float):
        self.steps_per_epoch, self.period, self.min_ratio = steps_per_epoch, period, min_ratio

    def __call__(self, step: int) -> float:
        return cosine_cycles_factor(step // self.steps_per_epoch, self.period, self.min_ratio)


def build_optimizer(model: nn.Module, cfg: OptimConfig, total_steps: int, steps_per_epoch: int | None = None):
    """Torch AdamW (or Adam) over the trainable parameters and its schedule, stepped once per
    step. ``cosine_cycles`` and ``step`` need ``steps_per_epoch`` (their lr changes at epoch
    boundaries only)."""
    params = [p for p in model.parameters() if p.requires_grad]
    adam = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    opt = adam(params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)
    schedule = cfg.schedule or "cosine"
    if schedule == "cosine":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, total_steps), eta_min=cfg.min_lr)
    elif schedule == "cosine_cycles":
        if not steps_per_epoch:
            raise ValueError("optim.schedule cosine_cycles needs the number of steps per epoch")
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, _CosineCycles(steps_per_epoch, cfg.cycle_epochs, cfg.min_lr / cfg.lr))
    elif schedule == "step":
        if not steps_per_epoch:
            raise ValueError("optim.schedule step needs the number of steps per epoch")
        if cfg.step_delay_epochs:
            sched = torch.optim.lr_scheduler.LambdaLR(
                opt, _DelayedSteps(steps_per_epoch, cfg.step_epochs, cfg.step_gamma, cfg.step_delay_epochs))
        else:
            sched = torch.optim.lr_scheduler.StepLR(opt, step_size=cfg.step_epochs * steps_per_epoch,
                                                    gamma=cfg.step_gamma)
    else:
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    return opt, sched


def build_engine(model: nn.Module, cfg: OptimConfig, total_steps: int, steps_per_epoch: int | None = None,
                 use_gpu: bool = False):
    """(engine, optimizer, scheduler); the engine's ``backward``/``step`` replace torch's.
    The model moves to this rank's device (``hardware.training_device``)."""
    select_accelerator(use_gpu)
    import deepspeed

    device = training_device(use_gpu)
    if use_gpu:
        torch.cuda.set_device(device)
    model = model.to(device)
    opt, sched = build_optimizer(model, cfg, total_steps, steps_per_epoch)
    config = ds_config(cfg, use_gpu)
    use_current_collectives()
    exact = {n: p.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad} \
        if config["bf16"]["enabled"] else {}
    engine, opt, _, sched = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched, config=config)
    use_current_collectives()  # DeepSpeed created its backend just now when no group existed
    if exact:  # DeepSpeed starts its float32 masters from the bf16-rounded weights; start from the real ones
        set_master_weights(engine, exact)
    return engine, opt, sched


SHM_OP = "deepspeed_shm_comm"


def skip_shared_memory_op() -> None:
    """Keep DeepSpeed's communication backend from JIT-compiling its shared-memory all-reduce op
    on the CPU. Only ``inference_all_reduce`` uses it, never training; the build costs ~50 s of
    compiling on 2 cores whenever its command line changes (ranks then wait on its lock, nodes of a
    cluster on a shared home folder race for it). Without it DeepSpeed uses torch.distributed."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__[SHM_OP] = False  # what DeepSpeed's build_shm_op consults


def use_current_collectives() -> None:
    """Point DeepSpeed's communication backend at torch's current collectives. DeepSpeed 0.19
    picks ``all_gather_into_tensor``/``reduce_scatter_tensor``, which torch 2.14 deprecates
    (a FutureWarning on every ZeRO gather) in favour of ``all_gather_single``/
    ``reduce_scatter_single``: the same operations, the same arguments."""
    import deepspeed
    import torch.distributed as dist
    from deepspeed import comm

    skip_shared_memory_op()
    if dist.is_initialized():  # DeepSpeed wraps the existing group; before its first collective
        deepspeed.init_distributed(dist_backend=dist.get_backend(), verbose=False)
    backend = comm.comm.cdb
    if backend is None:
        return
    if hasattr(dist, "all_gather_single"):
        backend.all_gather_function = dist.all_gather_single
    if hasattr(dist, "reduce_scatter_single"):
        backend.reduce_scatter_function = dist.reduce_scatter_single


def _unfused_masters(opt) -> dict[int, torch.Tensor]:
    """FP16_UnfusedOptimizer (bf16 at ZeRO 0): id(bf16 param) -> its float32 master."""
    masters = {}
    for low, high in zip(getattr(opt, "fp16_groups", ()), getattr(opt, "fp32_groups", ())):
        masters.update({id(lp): hp for lp, hp in zip(low, high)})
    return masters


def master_state_dict(engine) -> dict[str, torch.Tensor]:
    """``engine.module.state_dict()`` with every trained parameter replaced by the optimizer's
    float32 master copy when the engine runs bf16 (ZeRO partitions gathered: a collective, so
    every rank calls it). Frozen parameters have no master copy: they are saved as the run used
    them. fp32 engines: the module's own state."""
    module = engine.module
    state = {k: v.detach() for k, v in module.state_dict().items()}
    if not engine.bfloat16_enabled():
        return state
    from deepspeed.utils import safe_get_full_fp32_param

    unfused = _unfused_masters(engine.optimizer)
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        full = safe_get_full_fp32_param(p)  # ZeRO 1/2 and BF16_Optimizer (all-reduces the fragments)
        if full is None:
            full = unfused.get(id(p))
        if full is None:
            raise RuntimeError(f"{type(engine.optimizer).__name__} holds no float32 master copy of {name}")
        state[name] = full.detach().reshape(p.shape).float()
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


def evaluation_module(engine, build: Callable[[], nn.Module]) -> nn.Module:
    """The module evaluation runs: the engine's, or, for a bf16 engine of a family that evaluates
    in fp32 only (``auto_bf16`` false: PMT-IQA), a new float32 model from ``build()`` holding the
    float32 masters (a new one, not a copy: the engine's module carries DeepSpeed's hooks). A
    collective under ZeRO: every rank calls it."""
    module = engine.module
    if not engine.bfloat16_enabled() or getattr(module, "auto_bf16", True):
        return module
    masters = master_state_dict(engine)
    full = build().float().to(engine.device)
    full.load_state_dict(masters)
    return full


def set_master_weights(engine, values: dict[str, torch.Tensor]) -> None:
    """Overwrite the float32 masters (and the bf16 weights) of the named trained parameters."""
    from deepspeed.utils import safe_set_full_fp32_param

    unfused = _unfused_masters(engine.optimizer)
    for name, p in engine.module.named_parameters():
        if name not in values:
            continue
        value = values[name].to(p.device, torch.float32).reshape(p.shape)
        if hasattr(p, "_hp_mapping"):
            safe_set_full_fp32_param(p, value)
        elif id(p) in unfused:
            unfused[id(p)].data.copy_(value.view_as(unfused[id(p)]))
        else:
            raise RuntimeError(f"{type(engine.optimizer).__name__} holds no float32 master copy of {name}")
        with torch.no_grad():
            p.copy_(value)
