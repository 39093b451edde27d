"""PMT-IQA's two losses over the global batch: L1 regression and cross-entropy over quality
classes, weighted by the task weighting (the progressive schedule lambda_reg = t / (T - 1),
lambda_cls = 1 - lambda_reg, or fixed weights as the public scripts run).

Targets by ``model.target_scale`` and ``model.class_rule`` (see :mod:`.targets`): the paper
recipe regresses the MOS scaled to [0, 1] by its dataset's range (``mos_unit``) and bins it into
10 equal classes; the reference recipe regresses the raw label and bins it by the public code's
per-dataset rules.

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
from liqe_dist.models.pmt_iqa.targets import per_dataset_classes

if TYPE_CHECKING:
    from liqe_dist.models.pmt_iqa.model import PMTIQA


def quality_class(mos_unit: torch.Tensor, classes: int = 10) -> torch.Tensor:
    """Class index ``floor(classes * mos_unit)`` clipped to ``0..classes-1`` (long)."""
    return (mos_unit * classes).floor().clamp(0, classes - 1).long()


def targets(cfg, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(regression target ``[N]`` float, 0 where there is no MOS; class ``[N]`` long) of a batch
    under ``cfg``'s target scale and class rule."""
    if "mos_unit" not in batch:
        raise KeyError("PMT-IQA needs the batch's 'mos_unit' (MOS scaled to [0, 1] per dataset; batches from "
                       "liqe_dist.data.stream.TrainBatches carry it)")
    has = batch["has_mos"]
    unit = torch.where(has, batch["mos_unit"], torch.zeros_like(batch["mos_unit"]))
    if cfg.target_scale == "unit" and cfg.class_rule == "unit_bins":
        return unit, quality_class(unit, cfg.classes)
    exact = batch.get("mos_exact", batch["mos"])  # float64: the class rules need the labels' own digits
    raw = torch.where(has, exact, torch.zeros_like(exact))
    if cfg.class_rule == "per_dataset":
        if cfg.class_datasets is None:
            raise ValueError("model.class_rule per_dataset needs model.class_datasets (filled from the training "
                             "data by PMTIQAConfig.bind_data)")
        labels = per_dataset_classes(raw, batch["dataset"], cfg.class_datasets)
    else:
        labels = quality_class(unit, cfg.classes)
    return (raw if cfg.target_scale == "raw" else unit), labels


def pmt_losses(model: "PMTIQA", batch: dict, classes: int) -> dict[str, LossTerm]:
    """``{"classification": CE, "regression": L1}`` as sums over the global batch's crops with
    a MOS, and their count."""
    target, labels = targets(model.cfg, batch)
    q, logits = model(batch["images"])                 # [B, U], [B, U, K]
    b, u = q.shape
    valid = batch["has_mos"][:, None].expand(b, u)
    l1 = torch.where(valid, (q - target[:, None].to(q.dtype)).abs(), torch.zeros_like(q)).sum()
    labels = labels[:, None].expand(b, u)
    ce = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none")
    ce = torch.where(valid.flatten(), ce, torch.zeros_like(ce)).sum()
    sums = all_reduce_sum_grad(torch.stack([ce, l1]))
    count = all_reduce_sum(valid.sum())
    return {"classification": LossTerm(sums[0], count), "regression": LossTerm(sums[1], count)}
