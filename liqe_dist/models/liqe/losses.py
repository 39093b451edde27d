"""The three fidelity losses of LIQE (eqs. 4-10), as sums and counts.

Each loss returns a :class:`LossTerm` (sum over its items, number of items) rather than a mean:
the mean over a global batch is then ``all_reduce(sum) / all_reduce(count)``, exact however the
batch is split across ranks, and a batch with nothing to compare contributes zero, not NaN.

Labels that a sample lacks are masked out: a dataset without scene labels adds nothing to the
scene loss (its count stays 0), it is never given a fake label.

Two recipes (:class:`LossConfig`), because the paper's equations and the code that produced its
Table 2 differ (github zwx8981/LIQE, ``MNL_Loss.py``: ``loss_m4``, ``Multi_Fidelity_Loss``,
``Fidelity_Loss_distortion``):

* ``phi_scale``: p_hat = Phi((q_x - q_y) / phi_scale). Paper: sqrt 2 (eq. 5). Reference: 1
  (``0.5 * (1 + erf(d / sqrt 2))``).
* ``ties``: ``both_ways`` (paper, eq. 4): p = 1[q(x) >= q(y)] over ordered pairs, so a tie has
  p = 1 for (x, y) and for (y, x). ``half`` (reference): p = (sign(q(x) - q(y)) + 1) / 2.
* ``pair_normalisation``: ``global`` (paper, eq. 10): one mean over all pairs of the global
  batch, so a dataset weighs by its number of pairs (16-image batches: 240 ordered pairs against
  12 for 4-image ones). ``per_dataset`` (reference): the mean over each dataset's pairs, then
  the mean over datasets.
* ``fidelity_eps``: 0 (paper) or 1e-8 (reference) added inside every square root of the three
  fidelity losses (it shifts each loss by about -1e-4 per square root, and keeps gradients
  finite at 0).

Pairs are ordered (x, y), x != y, in both recipes. The reference forms unordered pairs i < j;
that gives the same means, since a strict pair's two orders have equal loss and, with ``half``,
so do a tie's (f(1/2, Phi(d)) = f(1/2, Phi(-d))), so it needs no knob of its own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from liqe_dist.models.base import LossTerm

_SQRT2 = math.sqrt(2.0)

#: The knob values each recipe stands for (``schedule`` is ``optim.schedule``'s).
RECIPES: dict[str, dict] = {
    "paper": {"phi_scale": _SQRT2, "ties": "both_ways", "pair_normalisation": "global",
              "fidelity_eps": 0.0, "schedule": "cosine"},
    "reference": {"phi_scale": 1.0, "ties": "half", "pair_normalisation": "per_dataset",
                  "fidelity_eps": 1e-8, "schedule": "cosine_cycles"},
}


@dataclass(frozen=True)
class LossConfig:
    """Which form of the losses to train with: ``recipe`` sets every knob; a knob given
    explicitly overrides its recipe value (None: the recipe's). See the module docstring."""

    recipe: Literal["paper", "reference"] = "paper"
    phi_scale: float | None = None
    ties: Literal["both_ways", "half"] | None = None
    pair_normalisation: Literal["global", "per_dataset"] | None = None
    fidelity_eps: float | None = None

    def __post_init__(self) -> None:
        if self.recipe not in RECIPES:
            raise ValueError(f"loss.recipe must be one of {list(RECIPES)}, got {self.recipe!r}")
        for knob, value in RECIPES[self.recipe].items():
            if knob in self.__dataclass_fields__ and getattr(self, knob) is None:
                object.__setattr__(self, knob, value)  # frozen: fill the recipe's value once
        if not self.phi_scale > 0:
            raise ValueError(f"loss.phi_scale must be > 0, got {self.phi_scale}")
        if not 0 <= self.fidelity_eps < 1e-2:
            raise ValueError(f"loss.fidelity_eps must be in [0, 0.01), got {self.fidelity_eps}")
        if self.ties not in ("both_ways", "half"):
            raise ValueError(f"loss.ties must be both_ways or half, got {self.ties!r}")
        if self.pair_normalisation not in ("global", "per_dataset"):
            raise ValueError(f"loss.pair_normalisation must be global or per_dataset, "
                             f"got {self.pair_normalisation!r}")


PAPER = LossConfig("paper")


def _sqrt(x: torch.Tensor, eps: float = 0.0) -> torch.Tensor:
    """``sqrt(x + eps)``. With ``eps = 0``, sqrt(0) is exact and its gradient is taken as 0
    rather than inf (it is always multiplied by a zero target term, so the true gradient
    contribution is 0 too); the reference code's ``eps = 1e-8`` keeps it finite instead."""
    if eps > 0:
        return (x + eps).sqrt()
    return torch.where(x > 0, x.clamp_min(1e-12).sqrt(), torch.zeros_like(x))


def binary_fidelity(p: torch.Tensor, p_hat: torch.Tensor, eps: float = 0.0) -> torch.Tensor:
    """Elementwise ``1 - sqrt(p p_hat + eps) - sqrt((1-p)(1-p_hat) + eps)`` (eq. 6; ``eps`` 0
    in the paper, 1e-8 in the reference code)."""
    return 1.0 - _sqrt(p * p_hat, eps) - _sqrt((1.0 - p) * (1.0 - p_hat), eps)


def quality_loss(score: torch.Tensor, mos: torch.Tensor, group: torch.Tensor,
                 valid: torch.Tensor | None = None, cfg: LossConfig = PAPER) -> LossTerm:
    """Pairwise fidelity loss (eqs. 4-6) over every ordered pair within a group (dataset).

    ``score`` q_hat ``[N]``, ``mos`` ``[N]`` (higher is better), ``group`` ``[N]`` dataset ids,
    ``valid`` ``[N]`` bool (samples with a MOS). Ordered pairs (x, y), x != y: a strict pair
    appears twice with equal loss, so the mean equals the mean over unordered pairs. With
    ``ties="both_ways"`` a tie gives p = 1 both ways (eq. 4), which is minimised at p_hat = 1/2,
    so ties pull scores together rather than in an arbitrary direction; ``"half"`` gives p = 1/2.

    ``pair_normalisation="global"``: ``count`` is the number of pairs and ``mean`` their mean.
    ``"per_dataset"``: ``total`` is the sum over datasets of each one's mean over its pairs and
    ``count`` the number of datasets with a pair, so ``mean`` is the mean over datasets.
    """
    n = score.shape[0]
    mask = group[:, None] == group[None, :]
    mask &= ~torch.eye(n, dtype=torch.bool, device=score.device)
    if valid is not None:
        mask &= valid[:, None] & valid[None, :]
    score = score.to(torch.promote_types(score.dtype, torch.float32))  # bf16 -> fp32, fp64 stays
    d = score[:, None] - score[None, :]
    p_hat = 0.5 * (1.0 + torch.erf(d / (cfg.phi_scale * _SQRT2)))  # Phi(d / phi_scale)
    mos = mos.to(score.dtype)
    if cfg.ties == "both_ways":
        p = (mos[:, None] >= mos[None, :]).to(score.dtype)
    else:
        p = 0.5 * (torch.sign(mos[:, None] - mos[None, :]) + 1.0)
    # where, not a product: a sample without a MOS (NaN) has a NaN target under "half", and NaN * 0 is NaN
    per_pair = torch.where(mask, binary_fidelity(p, p_hat, cfg.fidelity_eps), torch.zeros_like(p_hat))
    if cfg.pair_normalisation == "global":
        return LossTerm(per_pair.sum(), mask.sum())
    # per dataset, without reading the group ids on the host: row i's share of its dataset's
    # mean is (its pairs' loss) / (its dataset's pairs); a dataset counts once, as 1/size per member
    same = (group[:, None] == group[None, :]).to(score.dtype)
    group_pairs = same @ mask.sum(dim=1).to(score.dtype)
    has_pairs = group_pairs > 0
    total = torch.where(has_pairs, per_pair.sum(dim=1) / group_pairs.clamp_min(1), torch.zeros_like(group_pairs))
    datasets = (has_pairs.to(score.dtype) / same.sum(dim=1)).sum().round().long()
    return LossTerm(total.sum(), datasets)


def scene_loss(p_scene: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, eps: float = 0.0) -> LossTerm:
    """Multi-label scene loss (eq. 7): per image, mean over scenes of the binary fidelity.

    ``p_scene`` ``[N, S]`` marginals, ``target`` ``[N, S]`` multi-hot, ``mask`` ``[N]`` bool.
    """
    per_image = binary_fidelity(target.to(p_scene.dtype), p_scene, eps).mean(dim=1)
    return LossTerm((per_image * mask).sum(), mask.sum())


def distortion_loss(p_dist: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, eps: float = 0.0) -> LossTerm:
    """Multi-class fidelity loss (eq. 9) ``1 - sum_d sqrt(p(d|x) p_hat(d|x))`` with one-hot p.

    ``p_dist`` ``[N, D]``, ``target`` ``[N]`` class indices (any value where ``mask`` is False).
    """
    onehot = torch.zeros_like(p_dist)
    idx = target.clamp(0, p_dist.shape[1] - 1).long()
    onehot.scatter_(1, idx[:, None], 1.0)
    per_image = 1.0 - _sqrt(onehot * p_dist, eps).sum(dim=1)
    return LossTerm((per_image * mask).sum(), mask.sum())
