"""Evaluating a LIQE model on packed shard sets: per-dataset SRCC/PLCC and task accuracies.

Scene accuracy follows the reference code: an image with k scene labels counts a hit for each
label found among the model's top-k scenes. Distortion accuracy: argmax equals the label.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from .crops import CropConfig
from .data.packing import read_manifest
from .data.stream import EvalSamples, collate_eval
from .metrics import Correlation, correlation
from .model import LIQE


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


def _update(ev: DatasetEval, batch: dict, out) -> None:
    ev.keys.extend(batch["keys"])
    ev.score.extend(out.score.tolist())
    ev.mos.extend(batch["mos"].tolist())
    for i in range(len(batch["keys"])):
        k = int(batch["scenes"][i].sum())
        if k and out.scene.shape[1] > 1:
            top = set(out.scene[i].topk(k).indices.tolist())
            ev.scene_hits += sum(int(j in top) for j in torch.nonzero(batch["scenes"][i]).flatten().tolist())
            ev.scene_labels += k
        if batch["has_distortion"][i] and out.distortion.shape[1] > 1:
            ev.distortion_hits += int(out.distortion[i].argmax() == batch["distortion"][i])
            ev.distortion_labels += 1


@torch.inference_mode()
def evaluate_shards(model: LIQE, shard_dirs: list[str | Path], split: int = 0, part: str = "test",
                    crops: CropConfig = CropConfig(), batch_images: int = 8, workers: int = 0,
                    rank: int = 0, world: int = 1, progress: bool = True) -> dict[str, DatasetEval]:
    """Score every image of ``part`` of split ``split`` in each shard set (this rank's share
    when ``world`` > 1) and compute the criteria; keyed by dataset name."""
    model.eval()
    results = {}
    for d, shard_dir in enumerate(shard_dirs):
        manifest = read_manifest(Path(shard_dir))
        ev = DatasetEval(manifest["dataset"])
        total = manifest["splits"]["counts"][split][part]
        loader = DataLoader(EvalSamples(shard_dir, split, part, crops, rank, world, dataset_id=d),
                            batch_size=batch_images, num_workers=workers, collate_fn=collate_eval)
        with tqdm(total=total, desc=f"eval {ev.dataset} {part}", unit="img", disable=not progress) as bar:
            for batch in loader:
                ev.skipped += batch["skipped"]
                if batch["images"] is None:
                    continue
                _update(ev, batch, model(batch["images"]))
                bar.update(len(batch["keys"]))
        results[ev.dataset] = ev.finish() if world == 1 else ev
    return results
