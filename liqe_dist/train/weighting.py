"""Task loss weighting: dynamic weight averaging (DWA, eq. 11), equal, and PMT-IQA's progressive,
and the weighted total loss (eq. 10).

A weighting is an explicit object whose whole state is a few tensors and integers
(:meth:`state_dict`), so it checkpoints with ``torch.save`` / ``weights_only`` loads, and its
period statistics (per-task loss sums and counts) can be all-reduced across ranks before a
period closes, so every rank computes the same weights at the same step.

Usage each step: ``w = weighting.weights()`` -> loss -> ``weighting.observe({task: loss})``;
periods close by themselves every ``period_steps`` observations (or call ``end_period``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal

import torch

from liqe_dist.models.base import LossTerm

Reducer = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class WeightingConfig:
    """``method``: dwa | equal | progressive | fixed. ``period_steps``: steps per weighting period
    (None: one epoch, as the reference). ``temperature``: DWA's tau_2. ``scale``: the weights'
    sum for DWA (None: the number of tasks K, as in DWA). ``easy``/``hard``: the tasks of the
    progressive schedule. ``weights``: ``task -> lambda`` of ``fixed`` (every task of the model;
    the PMT-IQA public code's ``learn.py``: regression 0.942, classification 0.960)."""

    method: Literal["dwa", "equal", "progressive", "fixed"] = "dwa"
    temperature: float = 2.0
    period_steps: int | None = None
    scale: float | None = None
    easy: str = "classification"
    hard: str = "regression"
    weights: dict[str, float] | None = None

    def __post_init__(self) -> None:
        if self.method not in ("dwa", "equal", "progressive", "fixed"):
            raise ValueError(f"weighting.method must be dwa, equal, progressive or fixed, got {self.method!r}")
        if (self.method == "fixed") != (self.weights is not None):
            raise ValueError("weighting.weights is the lambda of every task under method fixed, and only there")
        for task, value in (self.weights or {}).items():
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"weighting.weights.{task} must be a finite number >= 0, got {value!r}")
        if self.temperature <= 0:
            raise ValueError(f"weighting.temperature must be > 0, got {self.temperature}")
        if self.period_steps is not None and self.period_steps < 1:
            raise ValueError(f"weighting.period_steps must be >= 1, got {self.period_steps}")


class TaskWeighting:
    """Base: accumulates per-period loss statistics; subclasses turn history into weights."""

    def __init__(self, tasks: tuple[str, ...], period_steps: int):
        if not tasks:
            raise ValueError("weighting needs at least one task")
        if period_steps < 1:
            raise ValueError(f"period_steps must be >= 1, got {period_steps}")
        self.tasks = tuple(tasks)
        self.period_steps = period_steps
        self.period = 0
        self.steps = 0
        self.sums = torch.zeros(len(tasks), dtype=torch.float64)
        self.counts = torch.zeros(len(tasks), dtype=torch.float64)
        self.history = torch.zeros(0, len(tasks), dtype=torch.float64)  # [periods, tasks] means
        self._weights = self._compute()

    def weights(self) -> dict[str, float]:
        """lambda_j for the current period."""
        return dict(zip(self.tasks, self._weights))

    def observe(self, losses: dict[str, float | torch.Tensor], reduce: Reducer | None = None) -> None:
        """Record one step's per-task mean losses; closes the period after ``period_steps``.

        A task absent from ``losses`` (no labelled samples this step) adds nothing.
        """
        for name, value in losses.items():
            i = self.tasks.index(name)
            self.sums[i] += float(value)
            self.counts[i] += 1
        self.steps += 1
        if self.steps >= self.period_steps:
            self.end_period(reduce)

    def end_period(self, reduce: Reducer | None = None) -> None:
        """Close the period: (optionally all-reduce the sums and counts), store the means,
        compute the next period's weights."""
        stats = torch.stack([self.sums, self.counts])
        if reduce is not None:
            stats = reduce(stats)
        sums, counts = stats[0], stats[1]
        means = torch.where(counts > 0, sums / counts.clamp_min(1), torch.full_like(sums, math.nan))
        self.history = torch.cat([self.history, means[None]])
        self.period += 1
        self.steps = 0
        self.sums.zero_()
        self.counts.zero_()
        self._weights = self._compute()

    def _compute(self) -> list[float]:
        raise NotImplementedError

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {
            "period": torch.tensor(self.period), "steps": torch.tensor(self.steps),
            "sums": self.sums.clone(), "counts": self.counts.clone(), "history": self.history.clone(),
        }

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if state["sums"].shape != self.sums.shape:
            raise ValueError(f"weighting state is for {state['sums'].shape[0]} tasks, this one has {len(self.tasks)}")
        self.period = int(state["period"])
        self.steps = int(state["steps"])
        self.sums = state["sums"].clone().double()
        self.counts = state["counts"].clone().double()
        self.history = state["history"].clone().double()
        self._weights = self._compute()


class EqualWeighting(TaskWeighting):
    """lambda_j = 1 for every task (ablation 5 of Table 4)."""

    def _compute(self) -> list[float]:
        return [1.0] * len(self.tasks)


class FixedWeighting(TaskWeighting):
    """lambda_j given per task, constant (the PMT-IQA public scripts without ``--dyn_weight``)."""

    def __init__(self, tasks: tuple[str, ...], period_steps: int, weights: dict[str, float]):
        if set(weights) != set(tasks):
            raise ValueError(f"weighting.weights must give every task {list(tasks)}, got {sorted(weights)}")
        self.fixed = dict(weights)
        super().__init__(tasks, period_steps)

    def _compute(self) -> list[float]:
        return [float(self.fixed[t]) for t in self.tasks]


class DWAWeighting(TaskWeighting):
    """Dynamic weight averaging (eq. 11): lambda_j = K exp(w_j / tau) / sum_i exp(w_i / tau),
    w_j = mean loss of period t-1 / mean loss of period t-2; equal weights (1) in periods 0, 1.

    A task with no loss in either period, or a zero loss two periods back, gets w_j = 1.
    """

    def __init__(self, tasks: tuple[str, ...], period_steps: int, temperature: float = 2.0,
                 scale: float | None = None):
        self.temperature = temperature
        self.scale = float(len(tasks)) if scale is None else scale
        super().__init__(tasks, period_steps)

    def _compute(self) -> list[float]:
        if self.history.shape[0] < 2:
            return [self.scale / len(self.tasks)] * len(self.tasks)
        last, before = self.history[-1], self.history[-2]
        ok = torch.isfinite(last) & torch.isfinite(before) & (before > 0)
        w = torch.where(ok, last / torch.where(ok, before, torch.ones_like(before)), torch.ones_like(last))
        lam = self.scale * torch.softmax(w / self.temperature, dim=0)
        return lam.tolist()


class ProgressiveWeighting(TaskWeighting):
    """PMT-IQA: weight moves from the easy task to the hard one over ``total_periods``:
    lambda_hard = t / (T - 1), lambda_easy = 1 - lambda_hard (t = period index)."""

    def __init__(self, tasks: tuple[str, ...], period_steps: int, total_periods: int,
                 easy: str, hard: str):
        for name in (easy, hard):
            if name not in tasks:
                raise ValueError(f"progressive weighting: task {name!r} not among {tasks}")
        if total_periods < 1:
            raise ValueError(f"total_periods must be >= 1, got {total_periods}")
        self.total_periods, self.easy, self.hard = total_periods, easy, hard
        super().__init__(tasks, period_steps)

    def _compute(self) -> list[float]:
        t = min(self.period, self.total_periods - 1)
        hard = 1.0 if self.total_periods == 1 else t / (self.total_periods - 1)
        out = {name: 1.0 for name in self.tasks}
        out[self.hard], out[self.easy] = hard, 1.0 - hard
        return [out[name] for name in self.tasks]


def build_weighting(cfg: WeightingConfig, tasks: tuple[str, ...], steps_per_epoch: int,
                    total_epochs: int = 1) -> TaskWeighting:
    """The weighting ``cfg`` names, with periods of ``cfg.period_steps`` or one epoch."""
    period = cfg.period_steps or steps_per_epoch
    if cfg.method == "equal":
        return EqualWeighting(tasks, period)
    if cfg.method == "dwa":
        return DWAWeighting(tasks, period, cfg.temperature, cfg.scale)
    if cfg.method == "fixed":
        return FixedWeighting(tasks, period, cfg.weights)
    total_periods = max(1, math.ceil(total_epochs * steps_per_epoch / period))
    return ProgressiveWeighting(tasks, period, total_periods, cfg.easy, cfg.hard)


def weighted_total(terms: dict[str, LossTerm], weights: dict[str, float]) -> torch.Tensor:
    """The loss a step trains on (LIQE's eq. 10, PMT-IQA's lambda_reg L1 + lambda_cls CE): ``sum_j lambda_j * mean_j`` over the tasks present in ``terms``."""
    total = None
    for name, term in terms.items():
        part = weights[name] * term.mean
        total = part if total is None else total + part
    if total is None:
        raise ValueError("no loss terms to combine")
    return total
