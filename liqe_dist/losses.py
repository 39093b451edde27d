"""The three fidelity losses of LIQE (eqs. 4-10), as sums and counts.

Each loss returns a :class:`LossTerm` (sum over its items, number of items) rather than a mean:
the mean over a global batch is then ``all_reduce(sum) / all_reduce(count)``, exact however the
batch is split across ranks, and a batch with nothing to compare contributes zero, not NaN.

Labels that a sample lacks are masked out: a dataset without scene labels adds nothing to the
scene loss (its count stays 0), it is never given a fake label.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

_SQRT2 = math.sqrt(2.0)


@dataclass
class LossTerm:
    """``total``: sum of per-item losses (a graph-connected scalar); ``count``: items summed."""

    total: torch.Tensor
    count: int

    @property
    def mean(self) -> torch.Tensor:
        return self.total / max(self.count, 1)


def _sqrt(x: torch.Tensor) -> torch.Tensor:
    # sqrt(0) is exact and its gradient is taken as 0 rather than inf (it is always multiplied by
    # a zero target term, so the true gradient contribution is 0 too).
    return torch.where(x > 0, x.clamp_min(1e-12).sqrt(), torch.zeros_like(x))


def binary_fidelity(p: torch.Tensor, p_hat: torch.Tensor) -> torch.Tensor:
    """Elementwise ``1 - sqrt(p p_hat) - sqrt((1-p)(1-p_hat))`` (eq. 6)."""
    return 1.0 - _sqrt(p * p_hat) - _sqrt((1.0 - p) * (1.0 - p_hat))


def quality_loss(score: torch.Tensor, mos: torch.Tensor, group: torch.Tensor,
                 valid: torch.Tensor | None = None) -> LossTerm:
    """Pairwise fidelity loss (eqs. 4-6) over every ordered pair within a group (dataset).

    ``score`` q_hat ``[N]``, ``mos`` ``[N]`` (higher is better), ``group`` ``[N]`` dataset ids,
    ``valid`` ``[N]`` bool (samples with a MOS). Ordered pairs (x, y), x != y: a strict pair
    appears twice with equal loss, so the mean equals the mean over unordered pairs; a tie gives
    p = 1 both ways (eq. 4), which is minimised at p_hat = 1/2, so ties pull scores together
    rather than in an arbitrary direction.
    """
    n = score.shape[0]
    mask = group[:, None] == group[None, :]
    mask &= ~torch.eye(n, dtype=torch.bool, device=score.device)
    if valid is not None:
        mask &= valid[:, None] & valid[None, :]
    score = score.float()
    p_hat = 0.5 * (1.0 + torch.erf((score[:, None] - score[None, :]) / 2.0))  # Phi(d / sqrt 2)
    p = (mos[:, None] >= mos[None, :]).to(score.dtype)
    per_pair = binary_fidelity(p, p_hat)
    return LossTerm((per_pair * mask).sum(), int(mask.sum().item()))


def scene_loss(p_scene: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> LossTerm:
    """Multi-label scene loss (eq. 7): per image, mean over scenes of the binary fidelity.

    ``p_scene`` ``[N, S]`` marginals, ``target`` ``[N, S]`` multi-hot, ``mask`` ``[N]`` bool.
    """
    per_image = binary_fidelity(target.to(p_scene.dtype), p_scene).mean(dim=1)
    return LossTerm((per_image * mask).sum(), int(mask.sum().item()))


def distortion_loss(p_dist: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> LossTerm:
    """Multi-class fidelity loss (eq. 9) ``1 - sum_d sqrt(p(d|x) p_hat(d|x))`` with one-hot p.

    ``p_dist`` ``[N, D]``, ``target`` ``[N]`` class indices (any value where ``mask`` is False).
    """
    onehot = torch.zeros_like(p_dist)
    idx = target.clamp(0, p_dist.shape[1] - 1).long()
    onehot.scatter_(1, idx[:, None], 1.0)
    per_image = 1.0 - _sqrt(onehot * p_dist).sum(dim=1)
    return LossTerm((per_image * mask).sum(), int(mask.sum().item()))


def weighted_total(terms: dict[str, LossTerm], weights: dict[str, float]) -> torch.Tensor:
    """Eq. 10: ``sum_j lambda_j * mean_j`` over the tasks present in ``terms``."""
    total = None
    for name, term in terms.items():
        part = weights[name] * term.mean
        total = part if total is None else total + part
    if total is None:
        raise ValueError("no loss terms to combine")
    return total
