"""Evaluating a model of any family on packed shard sets: per-dataset SRCC/PLCC, and scene and
distortion accuracy for models with those heads (LIQE).

Scene accuracy follows the reference code: an image with k scene labels counts a hit for each
label found among the model's top-k scenes. Distortion accuracy: argmax equals the label.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from liqe_dist.data.crops import CropConfig
from liqe_dist.hardware import move_batch
from liqe_dist.data.packing import read_manifest
from liqe_dist.data.stream import DatasetSpec, EvalSamples, collate_eval
from liqe_dist.eval.metrics import Correlation, correlation
from liqe_dist.models.base import IQAModel, Prediction
from liqe_dist.outputs import claim_dir
from liqe_dist.tables import csv_writer


@dataclass
class DatasetEval:
    """Predictions and criteria for one dataset's split part."""

    dataset: str
    keys: list[str] = field(default_factory=list)
    score: list[float] = field(default_factory=list)
    mos: list[float] = field(default_factory=list)
    scene_hits: int = 0
    scene_labels: int = 0
    distortion_hits: int = 0
    distortion_labels: int = 0
    skipped: int = 0
    quality: Correlation | None = None

    def finish(self) -> "DatasetEval":
        """Compute ``quality`` (SRCC/PLCC/...) over the images that have a MOS."""
        mos = np.array(self.mos, dtype=float)
        ok = ~np.isnan(mos)
        self.quality = correlation(np.array(self.score, dtype=float)[ok], mos[ok])
        return self

    @property
    def scene_accuracy(self) -> float:
        return self.scene_hits / self.scene_labels if self.scene_labels else float("nan")

    @property
    def distortion_accuracy(self) -> float:
        return self.distortion_hits / self.distortion_labels if self.distortion_labels else float("nan")


def batch_statistics(model: IQAModel, batch: dict, device: torch.device) -> torch.Tensor:
    """Forward one evaluation batch on ``device`` and reduce it there to ``[N, 4]`` float64 rows
    ``(score, scene hits, scene labels, distortion hit)``; distortion hit is -1 where the image
    has no distortion label (or the task is off). One copy to the device, none back.

    Scene hits follow the reference: an image with k scene labels counts each label found among
    the model's top-k scenes (the rank of a scene is its position in descending probability).
    """
    batch = move_batch(batch, device)
    return output_statistics(model.predict(batch["images"]), batch)


def output_statistics(out: Prediction, batch: dict) -> torch.Tensor:
    """:func:`batch_statistics` from the model's prediction ``out`` (on the batch's device)."""
    labels = batch["scenes"] > 0
    k = labels.sum(dim=1)
    scene, distortion = out.heads.get("scene"), out.heads.get("distortion")
    if scene is not None and scene.shape[1] > 1:
        order = scene.argsort(dim=1, descending=True, stable=True)
        position = torch.empty_like(order).scatter_(1, order, torch.arange(order.shape[1], device=order.device)
                                                    .expand_as(order).contiguous())
        hits = (labels & (position < k[:, None])).sum(dim=1)
    else:
        hits, k = torch.zeros_like(k), torch.zeros_like(k)
    if distortion is not None and distortion.shape[1] > 1:
        hit = (distortion.argmax(dim=1) == batch["distortion"]).double()
        dist_hit = torch.where(batch["has_distortion"], hit, torch.full_like(hit, -1.0))
    else:
        dist_hit = torch.full_like(out.quality, -1.0, dtype=torch.float64)
    return torch.stack([out.quality.double(), hits.double(), k.double(), dist_hit], dim=1)


def _update(ev: DatasetEval, batch: dict, stats: list[list[float]]) -> None:
    """Add one batch (host copy of :func:`batch_statistics`) to ``ev``."""
    ev.keys.extend(batch["keys"])
    ev.mos.extend(batch["mos"].tolist())
    for score, hits, labels, dist_hit in stats:
        ev.score.append(score)
        ev.scene_hits += int(hits)
        ev.scene_labels += int(labels)
        if dist_hit >= 0:
            ev.distortion_hits += int(dist_hit)
            ev.distortion_labels += 1


def _shard_rules(entry: str | Path | DatasetSpec, crops: CropConfig) -> tuple[Path, CropConfig, str]:
    """(shard folder, crop rules, label) of one entry of :func:`evaluate_shards`' ``shard_dirs``:
    a folder is scored on its MOS with ``crops``; a :class:`DatasetSpec` with its own resize and
    label."""
    if isinstance(entry, DatasetSpec):
        return Path(entry.shards), entry.crop_rules(crops), entry.label
    return Path(entry), crops, "mos"


@torch.inference_mode()
def evaluate_shards(model: IQAModel, shard_dirs: Sequence[str | Path | DatasetSpec], split: int = 0,
                    part: str = "test", crops: CropConfig = CropConfig(), batch_images: int = 8, workers: int = 0,
                    rank: int = 0, world: int = 1, progress: bool = True,
                    device: str | torch.device | None = None) -> dict[str, DatasetEval]:
    """Score every image of ``part`` of split ``split`` (``all``: the whole set) in each shard set (this rank's share
    when ``world`` > 1) and compute the criteria; keyed by dataset name. An entry of ``shard_dirs``
    is a shard folder, or a :class:`DatasetSpec` whose ``resize`` and ``label`` apply to its set
    (``mos`` then holds that label). ``device``: where the model runs (default: where its weights
    are); ``workers``: decoding processes."""
    model.eval()
    device = model.device if device is None else torch.device(device)
    results = {}
    for d, entry in enumerate(shard_dirs):
        shard_dir, rules, label = _shard_rules(entry, crops)
        manifest = read_manifest(shard_dir)
        ev = DatasetEval(manifest["dataset"])
        counts = manifest["splits"]["counts"][split]
        total = sum(counts.values()) if part == "all" else counts[part]
        loader = DataLoader(EvalSamples(shard_dir, split, part, rules, rank, world, dataset_id=d, label=label),
                            batch_size=batch_images, num_workers=workers, collate_fn=collate_eval,
                            pin_memory=device.type == "cuda")
        with tqdm(total=total, desc=f"eval {ev.dataset} {part}", unit="img", disable=not progress) as bar:
            for batch in loader:
                ev.skipped += batch["skipped"]
                if batch["images"] is None:
                    continue
                _update(ev, batch, batch_statistics(model, batch, device).tolist())
                bar.update(len(batch["keys"]))
        results[ev.dataset] = ev.finish() if world == 1 else ev
    return results


TABLE_HEADER = f"{'dataset':<11}{'model':<26}{'images':>7}{'SRCC':>8}{'PLCC':>8}{'scene acc':>11}{'dist acc':>10}"


def table_row(label: str, ev: DatasetEval) -> str:
    """One line of the results table (``TABLE_HEADER``) for dataset result ``ev`` of model ``label``."""
    q = ev.quality
    return (f"{ev.dataset:<11}{label:<26}{q.n:>7}{q.srcc:>8.3f}{q.plcc:>8.3f}"
            f"{_accuracy(ev.scene_accuracy):>11}{_accuracy(ev.distortion_accuracy):>10}")


def _accuracy(value: float) -> str:
    """An accuracy for the table; "-" where there is none (no such head, or no such labels)."""
    return "-" if math.isnan(value) else f"{value:.3f}"


def claim_eval_dir(out_dir: str | Path, inputs: Iterable[str | Path | None] = ()) -> Path:
    """``out_dir`` as ``eval``'s output folder (:func:`liqe_dist.outputs.claim_dir`; one it wrote
    before folders were marked has its metrics and predictions)."""
    return claim_dir(out_dir, "eval", inputs,
                     legacy=lambda p: (p / "metrics.csv").is_file() and (p / "predictions.csv").is_file())


def write_results(results: dict[str, DatasetEval], out_dir: str | Path, part: str) -> None:
    """``metrics.csv`` (one row per dataset), ``predictions.csv`` and ``scatter.png`` in ``out_dir``
    (text cells escaped: :mod:`liqe_dist.tables`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = claim_eval_dir(out_dir)
    with open(out / "metrics.csv", "w", newline="", encoding="utf-8", errors="surrogateescape") as f:
        w = csv_writer(f)
        w.writerow(["dataset", "part", "images", "srcc", "krcc", "plcc", "rmse", "scene_acc", "distortion_acc",
                    "skipped", "note"])
        for ev in results.values():
            q = ev.quality
            w.writerow([ev.dataset, part, q.n, q.srcc, q.krcc, q.plcc, q.rmse, ev.scene_accuracy,
                        ev.distortion_accuracy, ev.skipped, q.note])
    with open(out / "predictions.csv", "w", newline="", encoding="utf-8", errors="surrogateescape") as f:
        w = csv_writer(f)
        w.writerow(["dataset", "key", "score", "mos"])
        for ev in results.values():
            w.writerows([ev.dataset, k, round(float(s), 6), m] for k, s, m in zip(ev.keys, ev.score, ev.mos))
    fig, axes = plt.subplots(1, len(results), figsize=(4.5 * len(results), 4), squeeze=False)
    for ax, ev in zip(axes[0], results.values()):
        ax.scatter(ev.mos, ev.score, s=12, alpha=0.7)
        ax.set(xlabel="MOS", ylabel="predicted quality q_hat",
               title=f"{ev.dataset} ({part}): SRCC {ev.quality.srcc:.3f}")
    fig.tight_layout()
    fig.savefig(out / "scatter.png", dpi=110)
    plt.close(fig)
