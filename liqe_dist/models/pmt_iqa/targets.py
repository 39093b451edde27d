"""PMT-IQA's training targets as the two recipes define them.

Regression (``model.target_scale``):

* ``unit`` (paper recipe): ``mos_unit = (MOS - min) / (max - min)`` with the range of the
  dataset's shard manifest, so several datasets train one head.
* ``raw`` (reference recipe): the label as packed (``datasets[].label``: ``mos``, or e.g.
  KonIQ's ``mos_zscore``), as the public code regresses each dataset's own numbers, one dataset
  a run. The L1 term then weighs ``max - min`` times more against cross-entropy than on the
  unit scale (about 100x for LIVE, CLIVE, KonIQ z-scores, 5x for BID). LIVE and CSIQ are packed
  as 100 - DMOS and 1 - DMOS (higher is better) where the public code regresses DMOS: the same
  L1 under the reflection y -> c - y with the head's output reflected; the predictions keep the
  project's direction. :meth:`PMTIQA.predict` maps raw outputs onto 1-5 with the range recorded
  in ``model.target_range`` (a linear map: rank correlations are those of the raw output).

Classes (``model.class_rule``):

* ``unit_bins`` (paper recipe): ``floor(10 * mos_unit)``, the top of the range in class 9.
* ``per_dataset`` (reference recipe): the public code's rules (``folders.py``) on its labels,
  in float32 as it computes them from the label files' values (here from the batch's float64
  ``mos_exact``, so 1 - (1 - DMOS) gives the file's DMOS back before the float32 cast);
  ``round`` is half-to-even (numpy's and Python's):

  ======== ======================= =============================================
  dataset  public label            class
  ======== ======================= =============================================
  live     DMOS (realigned)        ``int(|DMOS / 10|)``, 9 when ``|DMOS| >= 100``
  csiq     DMOS 0..1               ``round(DMOS * 10)``
  clive    MOS 0..100              ``round(MOS / 10)``
  koniq10k MOS_zscore 0..100       ``round(MOS_zscore / 10)``
  bid      MOS 0..5                ``int(MOS / 0.5)`` (float64: openpyxl's value)
  ======== ======================= =============================================

  The public rules give class 10 for CSIQ DMOS >= 0.95 (its *worst* images), CLIVE MOS >= 95,
  KonIQ z >= 95 and BID MOS 5.0, where its 10-way cross-entropy would fail: here 10 is clipped
  to 9, a departure. DMOS classes run from best (0) to worst for LIVE and CSIQ, as the public
  code's; the classes of different datasets therefore mean different things, which is why the
  rule is only offered for one-dataset runs' datasets by name.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch

from liqe_dist.data.packing import read_manifest

if TYPE_CHECKING:
    from liqe_dist.data.stream import DatasetSpec
    from liqe_dist.models.pmt_iqa.config import PMTIQAConfig

log = logging.getLogger(__name__)
_WARNED: set[str] = set()

CLASSES = 10


def _live(mos: torch.Tensor) -> torch.Tensor:
    dmos = (100.0 - mos.double()).float()
    return torch.where(dmos.abs() >= 100, torch.full_like(dmos, 9), (dmos / 10).abs().floor())


def _csiq(mos: torch.Tensor) -> torch.Tensor:
    dmos = (1.0 - mos.double()).float()
    return (dmos * 10).round()


def _clive(mos: torch.Tensor) -> torch.Tensor:
    return (mos.float() / 10).round()


def _bid(mos: torch.Tensor) -> torch.Tensor:
    return (mos.double() / 0.5).trunc()


#: dataset (as packed) -> (the label the rule reads, the rule on that label as packed).
CLASS_RULES: dict[str, tuple[str, Callable[[torch.Tensor], torch.Tensor]]] = {
    "live": ("mos", _live),
    "csiq": ("mos", _csiq),
    "clive": ("mos", _clive),
    "koniq10k": ("mos_zscore", _clive),  # the same rule: round(x / 10)
    "bid": ("mos", _bid),
}


def per_dataset_classes(labels: torch.Tensor, dataset: torch.Tensor, names: tuple[str, ...]) -> torch.Tensor:
    """Class index per sample by the public code's rule of its dataset, clipped to 0..9 (long).
    ``labels`` ``[N]`` as packed (NaN where missing: class 0, masked by the caller), ``dataset``
    ``[N]`` ids into ``names``."""
    out = torch.zeros(labels.shape, dtype=torch.float64, device=labels.device)
    clean = torch.nan_to_num(labels, nan=0.0)
    for i, name in enumerate(names):  # where, not masked indexing: no host sync on a GPU
        out = torch.where(dataset == i, CLASS_RULES[name][1](clean).double(), out)
    return out.clamp(0, CLASSES - 1).long()


def dataset_facts(d: "DatasetSpec") -> tuple[str, tuple[float, float], dict]:
    """(packed dataset name, (min, max) of ``d.label``, the pack's source) from ``d``'s shard
    manifest."""
    from liqe_dist.data.stream import label_range

    manifest = read_manifest(Path(d.shards))
    try:
        return manifest["dataset"], label_range(d.shards, d.label, manifest), manifest.get("source") or {}
    except ValueError as exc:
        raise ValueError(f"datasets.{d.name}.label: {exc}") from None


def bind_targets(cfg: "PMTIQAConfig", datasets: "list[DatasetSpec]") -> "PMTIQAConfig":
    """``cfg`` with ``target_range`` (raw targets) and ``class_datasets`` (per-dataset classes)
    from the training data's manifests, always recomputed (facts of the data: a config given
    other datasets gets their facts); ``cfg`` itself when neither is needed."""
    if cfg.target_scale == "unit" and cfg.class_rule == "unit_bins":
        return cfg
    if cfg.target_scale == "raw" and len(datasets) != 1:
        raise ValueError(f"model.target_scale raw regresses one dataset's own labels a run (the public code's "
                         f"regime); datasets lists {len(datasets)}: train one per run (launch/configs/"
                         "protocol_pmt_iqa.yaml does) or set model.target_scale: unit")
    facts = [dataset_facts(d) for d in datasets]
    changes: dict = {"target_range": facts[0][1] if cfg.target_scale == "raw" else None, "class_datasets": None}
    if cfg.class_rule == "per_dataset":
        for d, (name, _, source) in zip(datasets, facts):
            labels = source.get("labels")
            if name == "live" and labels != "dmos_realigned.mat" and d.shards not in _WARNED:
                _WARNED.add(d.shards)  # once per process: configs are rebuilt often (workers, trials)
                log.warning("datasets.%s: %s was packed from %s; the public code's LIVE labels are "
                            "dmos_realigned.mat (liqe-dist pack live PATH --live-dmos realigned)",
                            d.name, d.shards, labels or "labels other than dmos_realigned.mat")
            if name not in CLASS_RULES:
                raise ValueError(f"model.class_rule per_dataset: datasets.{d.name} ({d.shards}) is packed as "
                                 f"{name!r}; the public code's rules cover {', '.join(CLASS_RULES)} "
                                 "(set model.class_rule: unit_bins)")
            wanted, label = CLASS_RULES[name][0], d.label
            if label != wanted:
                raise ValueError(f"model.class_rule per_dataset: {name}'s rule reads {wanted!r}; "
                                 f"datasets.{d.name}.label is {label!r}")
        changes["class_datasets"] = tuple(name for name, _, _ in facts)
    if all(getattr(cfg, k) == v for k, v in changes.items()):
        return cfg
    return replace(cfg, **changes)
