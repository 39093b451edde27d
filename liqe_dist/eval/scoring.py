"""Scoring images with a model of any family: quality on the 1-5 scale, plus the most likely
label of each head the family has (LIQE: scene and distortion; PMT-IQA: quality class).

Crops of several images are batched into one forward pass; decoding and cropping run in
DataLoader workers. A file that cannot be decoded is reported (path and reason) and skipped;
the rest are scored.
"""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterable, Iterator

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from liqe_dist.data.crops import CropConfig, ImageShapeError, eval_crops
from liqe_dist.hardware import precision_name, resolve_device
from liqe_dist.tables import csv_writer
from liqe_dist.data.images import ImageDecodeError, decode_image, is_image_path, to_rgb
from liqe_dist.models.base import IQAModel

LIST_SUFFIXES = (".txt", ".lst", ".list")


@dataclass
class ImageScore:
    """The prediction for one image."""

    source: str
    quality: float          # 1-5 (LIQE: q_hat in [1, C])
    heads: dict[str, tuple[str, float]]  # head -> (most likely label, its probability)
    width: int              # px, after the resize rules
    height: int
    upsampled: bool         # True when the image had a side under 224 px and was upscaled

    def row(self) -> dict:
        """Flat form for tables: source, quality, ``<head>``, ``<head>_prob``..., size, upsampled."""
        out = {"source": self.source, "quality": round(self.quality, 6)}
        for name, (label, prob) in self.heads.items():
            out[name], out[f"{name}_prob"] = label, round(prob, 6)
        out.update(width=self.width, height=self.height, upsampled=self.upsampled)
        return out


@dataclass
class ScoreFailure:
    """An input that could not be scored, and why."""

    source: str
    reason: str


def expand_sources(paths: Iterable[str | Path]) -> tuple[list[str], list[ScoreFailure]]:
    """Files as given, folders walked recursively for images, list files (.txt/.lst: one path
    per line, relative to the list's folder) read. Missing entries become failures."""
    sources: list[str] = []
    failures: list[ScoreFailure] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = sorted(str(p) for p in path.rglob("*") if p.is_file() and is_image_path(p))
            if not found:
                failures.append(ScoreFailure(str(path), "folder holds no image files"))
            sources.extend(found)
        elif path.is_file() and path.suffix.lower() in LIST_SUFFIXES:
            # paths are bytes on POSIX: decode as the file system does (undecodable bytes become
            # surrogate escapes), so any name the list holds round-trips to the same file
            for line in (os.fsdecode(b) for b in path.read_bytes().splitlines()):
                line = line.strip()
                if line and not line.startswith("#"):
                    entry = Path(line)
                    sources.append(str(entry if entry.is_absolute() else path.parent / entry))
        elif path.exists():
            sources.append(str(path))
        else:
            failures.append(ScoreFailure(str(path), "no such file or folder"))
    return sources, failures


class _CropDataset(Dataset):
    def __init__(self, items: list, crops: CropConfig):
        self.items = items
        self.crops = crops

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        item = self.items[i]
        source = item if isinstance(item, (str, Path)) else f"<image {i}>"
        try:
            img = item if isinstance(item, Image.Image) else decode_image(item)
            c = eval_crops(to_rgb(img), self.crops, source=str(source))
            return str(source), c, None
        except (ImageDecodeError, ImageShapeError) as exc:
            return str(source), None, getattr(exc, "reason", str(exc))


def _collate(batch):
    return batch


def default_crops(model: IQAModel, **changes) -> CropConfig:
    """The crops a family is scored with: its crop size and count (LIQE 15, PMT-IQA 4)."""
    return CropConfig(**{"size": model.crop_size, "eval_crops": model.eval_crops, **changes})


def default_batch_images(device: torch.device) -> int:
    """Images per forward pass when none is asked for: 2 on the CPU, 16 on a GPU. On the CPU a
    batch of 8 images (120 crops) ran ~10 % slower per image than 2 on ViT-B/32 (the
    activations outgrow the caches; ``bash launch/bench.sh pyiqa --batch-images N``); a GPU needs
    large batches to be busy."""
    return 2 if device.type == "cpu" else 16


def describe_run(model: IQAModel, device: torch.device | str, crops: CropConfig, batch_images: int) -> str:
    """The start line of every scoring or evaluation run: what decides its numbers (family,
    precision, crops) and its speed (device, batch)."""
    return (f"{model.family} on {device}, {precision_name(model.dtype)}, {crops.eval_crops} crops of {crops.size} px per image, "
            f"{batch_images} image(s) per batch")


class Scorer:
    """Scores images with a model of any family: ``Scorer(model).score(["a.jpg", pil_image])``.

    ``device``: ``auto`` (the GPU when there is one), ``cpu`` or ``cuda[:N]``. Crops are decoded
    in ``num_workers`` processes, cross to the device as uint8 (pinned memory on GPUs) and each
    batch's results come back in one copy.
    """

    def __init__(self, model: IQAModel, crops: CropConfig | None = None, batch_images: int | None = None,
                 num_workers: int = 0, device: str | torch.device = "auto"):
        self.device = resolve_device(str(device))
        self.model = model.eval() if model.device == self.device else model.eval().to(self.device)
        self.crops = crops or default_crops(model)
        self.batch_images = batch_images or default_batch_images(self.device)
        self.num_workers = num_workers

    def describe(self) -> str:
        """The start line of a scoring run (:func:`describe_run`)."""
        return describe_run(self.model, self.device, self.crops, self.batch_images)

    def predict(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 crops ``[B, U, 3, H, W]`` (any device) -> ``[B, 1 + 2 H]`` float64 on the device:
        quality, then each head's (probability, index) of its most likely label."""
        out = self.model.predict(pixels.to(self.device, non_blocking=self.device.type == "cuda"))
        cols = [out.quality.double()]
        for name in self.model.heads:
            prob, index = out.heads[name].max(dim=1)
            cols += [prob.double(), index.double()]
        return torch.stack(cols, dim=1)

    def score_iter(self, items: list, progress: bool = False) -> Iterator[ImageScore | ScoreFailure]:
        """Yield a score or a failure for each item (a path or a PIL image), in input order."""
        loader = DataLoader(_CropDataset(list(items), self.crops), batch_size=self.batch_images,
                            num_workers=self.num_workers, collate_fn=_collate)
        bar = tqdm(total=len(items), unit="img", desc="scoring", disable=not progress, file=sys.stderr)
        heads = self.model.heads
        with torch.inference_mode():
            for batch in loader:
                good = [(src, c) for src, c, err in batch if err is None]
                results: dict[str, ImageScore] = {}
                if good:
                    pixels = torch.stack([c.pixels for _, c in good])
                    if self.device.type == "cuda":
                        pixels = pixels.pin_memory()
                    rows = self.predict(pixels).tolist()  # the batch's one read of the device
                    for (src, c), (quality, *pairs) in zip(good, rows):
                        labels = {name: (names[int(pairs[2 * i + 1])], pairs[2 * i])
                                  for i, (name, names) in enumerate(heads.items())}
                        results[src] = ImageScore(source=src, quality=quality, heads=labels, width=c.size[0],
                                                  height=c.size[1], upsampled=c.upsampled)
                for src, _, err in batch:
                    if err is None and not math.isfinite(results[src].quality):
                        err = "the model's score is not a number (are its weights NaN?)"
                    yield ScoreFailure(src, err) if err is not None else results[src]
                bar.update(len(batch))
        bar.close()

    def score(self, images) -> list[ImageScore]:
        """Score one image or a list (paths or PIL images); raises on the first bad one."""
        single = isinstance(images, (str, Path, Image.Image))
        items = [images] if single else list(images)
        out = []
        for result in self.score_iter(items):
            if isinstance(result, ScoreFailure):
                raise ImageDecodeError(result.source, result.reason)
            out.append(result)
        return out


def write_scores(results: Iterable[ImageScore], stream: IO[str], fmt: str = "csv") -> int:
    """Write scores as CSV (with header) or JSON lines, flushing row by row (an interrupted run
    keeps what it scored); returns how many were written. Open ``stream`` with
    ``errors="surrogateescape"`` so file names that are not valid UTF-8 are written as their
    original bytes (JSON escapes them)."""
    n = 0
    writer = None
    for r in results:
        row = r.row()
        if fmt == "jsonl":
            stream.write(json.dumps(row) + "\n")
        else:
            if writer is None:  # text cells (file names) escaped against formula injection
                writer = csv_writer(stream)
                writer.writerow(list(row))
            writer.writerow(list(row.values()))
        stream.flush()
        n += 1
    return n
