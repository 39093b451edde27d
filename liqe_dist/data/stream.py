"""Streaming packed shards to training and evaluation.

Every reader is one *consumer*: a (rank, loader worker) pair, ``consumer = rank * workers +
worker`` of ``world * workers``. A consumer reads the shards assigned to it:

* when there are at least as many shards as consumers, shard ``i`` goes to consumer
  ``i mod consumers`` (training shuffles the shard list with a per-epoch seed first, so the
  assignment changes every epoch: open_clip's pattern);
* otherwise every consumer reads every shard and keeps the samples whose running index is
  ``consumer mod consumers``.

Either way each sample reaches exactly one consumer, which makes evaluation exact-once for any
number of ranks and workers. Labels are filtered (split part) before an image is decoded. A
sample that cannot be read is logged with its key and counted (``skipped`` in each batch).

A dataset (:class:`DatasetSpec`) may carry its own resize (``resize``: the crop rules'
``resize_to`` for it alone) and its own label (``label``: ``mos``, or a numeric field of the
records' ``extra``, scaled to [0, 1] by the manifest's ``extra_ranges``).
"""

from __future__ import annotations

import json
import logging
import random
import tarfile
from dataclasses import dataclass, replace
from itertools import chain
from pathlib import Path
from typing import Iterator

import torch
from torch.utils.data import IterableDataset, get_worker_info
from webdataset.tariterators import group_by_keys, tar_file_iterator

from liqe_dist.data.crops import CropConfig, ImageShapeError, check_size, eval_crops, train_crops
from liqe_dist.data.images import ImageDecodeError, decode_image
from liqe_dist.data.labels import DISTORTIONS, SCENES
from liqe_dist.data.packing import read_manifest
from liqe_dist.data.splits import in_part

log = logging.getLogger(__name__)


@dataclass
class RawSample:
    key: str
    shard: str
    fields: dict  # extension -> bytes


@dataclass
class CropSample:
    """A decoded, cropped sample with its labels."""

    key: str
    dataset: str
    pixels: torch.Tensor  # [U, 3, 224, 224]
    mos: float | None
    scenes: tuple[str, ...]
    distortion: str | None


def iter_shard(path: Path) -> Iterator[RawSample]:
    """The samples of one tar shard; a damaged shard is logged and read up to the damage."""
    try:
        with open(path, "rb") as f:
            files = (dict(entry, __url__=str(path)) for entry in tar_file_iterator(f))
            for s in group_by_keys(files):
                yield RawSample(s["__key__"], str(path), {k: v for k, v in s.items() if not k.startswith("__")})
    except (tarfile.TarError, OSError, ValueError) as exc:
        log.error("shard %s: unreadable from here on (%s)", path, exc)


def assigned(shards: list[Path], consumer: int, consumers: int) -> Iterator[RawSample]:
    """The samples of ``shards`` that belong to ``consumer`` (see the module docstring)."""
    if len(shards) >= consumers:
        for path in shards[consumer::consumers]:
            yield from iter_shard(path)
    else:
        for i, sample in enumerate(chain.from_iterable(iter_shard(p) for p in shards)):
            if i % consumers == consumer:
                yield sample


def consumer_id(rank: int, world: int) -> tuple[int, int]:
    """(consumer, consumers) for this process and DataLoader worker."""
    info = get_worker_info()
    worker, workers = (info.id, info.num_workers) if info else (0, 1)
    return rank * workers + worker, world * workers


def label_value(labels: dict, label: str = "mos") -> float | None:
    """The training/evaluation label of a sample's JSON ``labels``: its ``mos``, or the numeric
    field ``label`` of its ``extra``; None when the sample has none (then ``has_mos`` is false)."""
    if label == "mos":
        return labels.get("mos")
    value = (labels.get("extra") or {}).get(label)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def label_range(shard_dir: str | Path, label: str = "mos", manifest: dict | None = None) -> tuple[float, float]:
    """(min, max) of ``label`` over a packed set, from its manifest: ``mos_range`` for MOS,
    ``extra_ranges[label]`` for a field of the records' ``extra``."""
    manifest = read_manifest(Path(shard_dir)) if manifest is None else manifest
    if label == "mos":
        return tuple(manifest["mos_range"])
    value = (manifest.get("extra_ranges") or {}).get(label)
    if (not isinstance(value, (list, tuple)) or len(value) != 2
            or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in value)):
        raise ValueError(f"{shard_dir}: label {label!r} has no range in the manifest (extra_ranges.{label} "
                         f"is {value!r}, expected [min, max]); re-pack the set with that extra field")
    return float(value[0]), float(value[1])


class _Decoder:
    """Turns raw samples into :class:`CropSample` s, counting and logging the bad ones."""

    def __init__(self, crops: CropConfig):
        self.crops = crops  # the default; decode() may be given a dataset's own
        self.skipped = 0

    def labels(self, raw: RawSample) -> dict | None:
        try:
            return json.loads(raw.fields["json"])
        except (KeyError, ValueError) as exc:
            self._skip(raw, f"no readable labels ({type(exc).__name__})")
            return None

    def decode(self, raw: RawSample, labels: dict, train: bool, generator: torch.Generator | None,
               crops: CropConfig | None = None, label: str = "mos") -> CropSample | None:
        crops = self.crops if crops is None else crops
        images = [k for k in raw.fields if k != "json"]
        if len(images) != 1:
            self._skip(raw, f"expected one image field, found {images}")
            return None
        try:
            img = decode_image(raw.fields[images[0]], f"{raw.shard}:{raw.key}")
            c = (train_crops(img, crops, generator, source=raw.key) if train
                 else eval_crops(img, crops, source=raw.key, key=raw.key))
        except (ImageDecodeError, ImageShapeError) as exc:
            self._skip(raw, str(getattr(exc, "reason", exc)))
            return None
        return CropSample(raw.key, labels["dataset"], c.pixels, label_value(labels, label),
                          tuple(labels.get("scenes") or ()), labels.get("distortion"))

    def _skip(self, raw: RawSample, reason: str) -> None:
        self.skipped += 1
        log.warning("skipped sample %s in %s: %s", raw.key, raw.shard, reason)

    def take_skipped(self) -> int:
        n, self.skipped = self.skipped, 0
        return n


def collate(samples: list[CropSample], dataset_ids: list[int], skipped: int = 0,
            mos_ranges: list[tuple[float, float]] | None = None) -> dict:
    """Stack samples into a batch with label tensors and masks.

    ``images`` [N, U, 3, 224, 224] uint8; ``dataset`` [N] long; ``mos`` [N] float (NaN where
    missing), the same as float64 in ``mos_exact`` (rules on a label's digits: PMT-IQA's classes),
    and ``has_mos``; ``scenes`` [N, 9] multi-hot and ``has_scenes``; ``distortion`` [N]
    long (-1 where missing) and ``has_distortion``; ``keys``; ``skipped``: bad samples met since
    the last batch. With ``mos_ranges`` (each dataset id's (min, max) MOS) also ``mos_unit``
    [N]: the MOS scaled to [0, 1] by its dataset's range (:func:`unit_mos`).
    """
    n = len(samples)
    scenes = torch.zeros(n, len(SCENES))
    for i, s in enumerate(samples):
        for name in s.scenes:
            scenes[i, SCENES.index(name)] = 1.0
    mos = torch.tensor([float("nan") if s.mos is None else float(s.mos) for s in samples])
    dist = torch.tensor([-1 if s.distortion is None else DISTORTIONS.index(s.distortion) for s in samples])
    batch = {
        "images": torch.stack([s.pixels for s in samples]),
        "dataset": torch.tensor(dataset_ids, dtype=torch.long),
        "mos": mos, "has_mos": ~torch.isnan(mos),
        "mos_exact": torch.tensor([float("nan") if s.mos is None else float(s.mos) for s in samples],
                                  dtype=torch.float64),
        "scenes": scenes, "has_scenes": scenes.sum(dim=1) > 0,
        "distortion": dist, "has_distortion": dist >= 0,
        "keys": [s.key for s in samples],
        "skipped": skipped,
    }
    if mos_ranges is not None:
        batch["mos_unit"] = unit_mos(mos, batch["dataset"], mos_ranges)
    return batch


def unit_mos(mos: torch.Tensor, dataset: torch.Tensor, ranges: list[tuple[float, float]]) -> torch.Tensor:
    """``(mos - lo) / (hi - lo)`` with each sample's dataset range (NaN stays NaN; a dataset whose
    MOS are all equal maps to 0.5)."""
    table = torch.tensor(ranges, dtype=mos.dtype)[dataset]
    lo, span = table[:, 0], table[:, 1] - table[:, 0]
    flat = torch.where(mos.isnan(), mos, torch.full_like(mos, 0.5))
    return torch.where(span > 0, (mos - lo) / span.clamp_min(1e-12), flat)


def _shard_paths(shard_dir: Path) -> list[Path]:
    manifest = read_manifest(shard_dir)
    return [Path(shard_dir) / s["name"] for s in manifest["shards"]]


def warn_if_unmixed(shard_dir: Path) -> None:
    """Shards packed in source order hold a few references each; a bounded shuffle buffer then
    pairs versions of one photograph ~12x more often than a uniform shuffle (see packing)."""
    manifest = read_manifest(shard_dir)
    if manifest["pack"].get("order", "source") == "source" and manifest["splits"].get("by") == "reference":
        log.warning("%s was packed in source order (reference after reference): training batches will "
                    "mix references poorly; re-pack it (records are shuffled by default now)", shard_dir)


class EvalSamples(IterableDataset):
    """Every sample of one part ("val"/"test") of split ``split`` exactly once across all ranks
    and loader workers, with the evaluation crops (random positions are drawn from each sample's
    key, so they do not depend on ranks or workers either). ``mos`` is the sample's ``label``
    (:func:`label_value`). Use with ``DataLoader(batch_size=B, collate_fn=collate_eval)``."""

    def __init__(self, shard_dir: str | Path, split: int = 0, part: str = "test",
                 crops: CropConfig = CropConfig(), rank: int = 0, world: int = 1, dataset_id: int = 0,
                 label: str = "mos"):
        self.shards = _shard_paths(Path(shard_dir))
        self.split, self.part, self.crops, self.label = split, part, crops, check_label(label, "label")
        self.rank, self.world, self.dataset_id = rank, world, dataset_id

    def __iter__(self) -> Iterator[tuple[CropSample | None, int, int]]:
        consumer, consumers = consumer_id(self.rank, self.world)
        decoder = _Decoder(self.crops)
        for raw in assigned(self.shards, consumer, consumers):
            labels = decoder.labels(raw)
            if labels is None or not in_part(labels["splits"], self.split, self.part):
                continue
            sample = decoder.decode(raw, labels, train=False, generator=None, label=self.label)
            if sample is not None:
                yield sample, self.dataset_id, decoder.take_skipped()
        if decoder.skipped:  # bad samples after the last good one
            yield None, self.dataset_id, decoder.take_skipped()


def collate_eval(items: list[tuple[CropSample | None, int, int]]) -> dict | None:
    good = [(s, d) for s, d, _ in items if s is not None]
    skipped = sum(k for _, _, k in items)
    if not good:
        return {"images": None, "keys": [], "skipped": skipped}
    return collate([s for s, _ in good], [d for _, d in good], skipped)


@dataclass(frozen=True)
class DatasetSpec:
    """A packed shard set and its mini-batch size (reference: 4 for LIVE, CSIQ, BID, CLIVE; 16
    for KonIQ-10k and KADID-10k): an entry of a training config's ``datasets``. The size is each
    rank's, or the global one when the config says ``batch_is_global`` (:attr:`TrainConfig.rank_datasets`
    gives each rank's).

    ``resize``: (width, height) px this dataset's images are resized to before cropping (the crop
    rules' ``resize_to``, per dataset since the PMT-IQA public code resizes BID to [512, 512] and
    KonIQ to [384, 512]); None: the crop config's rule. ``label``: what it trains and is scored
    on: ``mos``, or a numeric field of the records' ``extra`` (KonIQ's ``mos_zscore``) whose
    range the manifest records under ``extra_ranges``."""

    name: str
    shards: str
    batch_size: int = 4
    resize: tuple[int, int] | None = None
    label: str = "mos"

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"datasets.{self.name}.batch_size must be >= 1, got {self.batch_size}")
        if self.resize is not None:  # frozen and hashable: a YAML list is stored as a tuple
            object.__setattr__(self, "resize", check_size(self.resize, f"datasets.{self.name}.resize"))
        check_label(self.label, f"datasets.{self.name}.label")

    def crop_rules(self, crops: CropConfig) -> CropConfig:
        """``crops`` with this dataset's ``resize`` as ``resize_to`` (unchanged without one)."""
        if self.resize is None:
            return crops
        try:
            return replace(crops, resize_to=self.resize)
        except ValueError as exc:
            raise ValueError(f"datasets.{self.name}.resize: {exc}") from None


def check_label(label: str, key: str) -> str:
    """``label`` is ``mos`` or a plain identifier (a field name of the records' ``extra``)."""
    if not isinstance(label, str) or not label.isidentifier():
        raise ValueError(f"{key} must be 'mos' or a field name of the records' extra (an identifier), "
                         f"got {label!r}")
    return label


class TrainBatches(IterableDataset):
    """Endless training batches: each step takes ``batch_size`` samples of every dataset's
    train split (per rank), concatenated, with dataset ids and ``mos_unit`` (MOS scaled by the
    range in each dataset's manifest). Use with ``DataLoader(batch_size=None)``.

    Per dataset and epoch the shard list is shuffled with ``(seed, epoch)`` before it is split
    across consumers; samples pass a shuffle buffer and get the training crops of the crop rules
    with the dataset's ``resize`` (:meth:`DatasetSpec.crop_rules`). ``mos`` is each dataset's
    ``label`` and ``mos_unit`` uses that label's range (:func:`label_range`).
    """

    def __init__(self, sources: list[DatasetSpec], split: int = 0, crops: CropConfig = CropConfig(),
                 seed: int = 0, rank: int = 0, world: int = 1, shuffle_buffer: int = 256, start_epoch: int = 0,
                 parts: tuple[str, ...] = ("train",)):
        if not sources:
            raise ValueError("no training datasets")
        self.parts = tuple(parts)  # the split's parts trained on (train; train + val: 80/20)
        self.sources = sources
        self.shards = [_shard_paths(Path(s.shards)) for s in sources]
        self.mos_ranges = [label_range(s.shards, s.label) for s in sources]
        self.dataset_crops = [s.crop_rules(crops) for s in sources]
        for s in sources:
            warn_if_unmixed(Path(s.shards))
        self.split, self.crops, self.seed = split, crops, seed
        self.rank, self.world = rank, world
        self.shuffle_buffer, self.start_epoch = shuffle_buffer, start_epoch

    def epoch_order(self, d: int, epoch: int, consumer: int, consumers: int,
                    decoder: _Decoder | None = None) -> Iterator[tuple[RawSample, dict]]:
        """Dataset ``d``'s training samples that ``consumer`` reads in ``epoch``, in the order
        training uses them (shard list shuffled with ``(seed, d, epoch)``, divided among the
        consumers, then the shuffle buffer), undecoded. Samples without readable labels are
        counted on ``decoder``."""
        decoder = decoder or _Decoder(self.crops)
        shards = list(self.shards[d])
        random.Random(hash((self.seed, d, epoch)) & 0xFFFFFFFF).shuffle(shards)
        rng = random.Random(hash((self.seed, d, epoch, consumer)) & 0xFFFFFFFF)
        buffer: list[tuple[RawSample, dict]] = []
        for raw in assigned(shards, consumer, consumers):
            labels = decoder.labels(raw)
            if labels is None or not any(in_part(labels["splits"], self.split, p) for p in self.parts):
                continue
            buffer.append((raw, labels))
            if len(buffer) >= self.shuffle_buffer:
                yield buffer.pop(rng.randrange(len(buffer)))
        rng.shuffle(buffer)
        yield from buffer

    def _endless(self, d: int, consumer: int, consumers: int, decoder: _Decoder) -> Iterator[CropSample]:
        epoch = self.start_epoch
        while True:
            gen = torch.Generator().manual_seed(hash((self.seed, d, epoch, consumer, 1)) & 0x7FFFFFFF)
            produced = 0
            for raw, labels in self.epoch_order(d, epoch, consumer, consumers, decoder):
                sample = decoder.decode(raw, labels, train=True, generator=gen, crops=self.dataset_crops[d],
                                        label=self.sources[d].label)
                if sample is not None:
                    produced += 1
                    yield sample
            if produced == 0:
                raise RuntimeError(f"{self.sources[d].shards}: consumer {consumer} of {consumers} got no "
                                   f"training samples in split {self.split} (epoch {epoch})")
            epoch += 1

    def __iter__(self) -> Iterator[dict]:
        consumer, consumers = consumer_id(self.rank, self.world)
        decoder = _Decoder(self.crops)
        streams = [self._endless(d, consumer, consumers, decoder) for d in range(len(self.sources))]
        while True:
            samples, ids = [], []
            for d, (stream, src) in enumerate(zip(streams, self.sources)):
                for _ in range(src.batch_size):
                    samples.append(next(stream))
                    ids.append(d)
            yield collate(samples, ids, decoder.take_skipped(), self.mos_ranges)
