"""PMT-IQA's two losses over the global batch: L1 regression of the scaled MOS and
cross-entropy over quality classes, weighted by the task weighting (the progressive schedule
lambda_reg = t / (T - 1), lambda_cls = 1 - lambda_reg by default).

Targets, as decided here (the public code differs, see below):

* ``regression``: the MOS scaled to [0, 1] by its dataset's range (``mos_unit`` in the batch:
  ``(MOS - min) / (max - min)`` with the range recorded in the dataset's shard manifest), so
  datasets with different scales train one head, as in LIQE's multi-dataset setting. The public
  code regresses each dataset's raw MOS and trains on one dataset at a time.
* ``classification``: ``floor(10 * mos_unit)`` clipped to 0..9, so the top of the range (1.0)
  is class 9. The public code bins each dataset's raw MOS by hand (``round(mos / 10)`` and the
  like), which yields index 10 for its top scores and makes CrossEntropyLoss fail.

Every crop is an item (the public code feeds each patch as a sample): a batch of B images with
U crops has B U items. Sums and counts are all-reduced with gradient (see
:mod:`liqe_dist.dist.collectives`), so the mean and its gradient are those of one process on the
union of the ranks' batches.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from liqe_dist.dist.collectives import all_reduce_sum, all_reduce_sum_grad
from liqe_dist.models.base import LossTerm

if TYPE_CHECKING:
    from liqe_dist.models.pmt_iqa.model import PMTIQA


def quality_class(mos_unit: torch.Tensor, classes: int = 10) -> torch.Tensor:
    """Class index ``floor(classes * mos_unit)`` clipped to ``0..classes-1`` (long)."""
    return (mos_unit * classes).floor().clamp(0, classes - 1).long()


def pmt_losses(model: "PMTIQA", batch: dict, classes: int) -> dict[str, LossTerm]:
    """``{"classification": CE, "regression": L1}`` as sums over the global batch's crops with
    a MOS, and their count."""
    if "mos_unit" not in batch:
        raise KeyError("PMT-IQA trains on MOS scaled to [0, 1] per dataset: the batch has no 'mos_unit' "
                       "(batches from liqe_dist.data.stream.TrainBatches carry it)")
    q, logits = model(batch["images"])                 # [B, U], [B, U, K]
    b, u = q.shape
    valid = batch["has_mos"][:, None].expand(b, u)
    target = torch.where(batch["has_mos"], batch["mos_unit"], torch.zeros_like(batch["mos_unit"]))
    l1 = torch.where(valid, (q - target[:, None].to(q.dtype)).abs(), torch.zeros_like(q)).sum()
    labels = quality_class(target, classes)[:, None].expand(b, u)
    ce = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none")
    ce = torch.where(valid.flatten(), ce, torch.zeros_like(ce)).sum()
    sums = all_reduce_sum_grad(torch.stack([ce, l1]))
    count = all_reduce_sum(valid.sum())
    return {"classification": LossTerm(sums[0], count), "regression": LossTerm(sums[1], count)}
