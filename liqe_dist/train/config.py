"""The typed configuration of a training run (``liqe-dist train --config FILE.yaml``)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

from liqe_dist.config import describe_changes, to_dict

from liqe_dist.data.crops import CropConfig
from liqe_dist.data.stream import DatasetSpec
from liqe_dist.dist.engine import OptimConfig
from liqe_dist.models.registry import ModelConfig, default_model_config
from liqe_dist.outputs import plain_name
from liqe_dist.train.weighting import WeightingConfig


GPU_CPUS_PER_WORKER = 8.0  # default CPUs per GPU rank: 7 loader processes + the training process


@dataclass(frozen=True)
class TrainConfig:
    """Everything a run needs; defaults are the reference recipe where it has one."""

    datasets: list[DatasetSpec]
    model: ModelConfig = field(default_factory=default_model_config)  # model.family picks the family
    optim: OptimConfig = field(default_factory=OptimConfig)
    weighting: WeightingConfig = field(default_factory=WeightingConfig)
    crops: CropConfig = field(default_factory=CropConfig)
    split: int = 0                  # which of the ten splits (0-based)
    epochs: int = 80               # 0: nothing is trained; the model as built is evaluated (zero-shot)
    steps_per_epoch: int = 200
    # steps: an epoch is steps_per_epoch steps; pass: one pass over the training parts, its
    # steps computed from the shard manifests (and recomputed whenever the config changes)
    epoch_length: Literal["steps", "pass"] = "steps"
    seed: int = 0
    workers: int = 2                # data-parallel ranks (Ray Train workers)
    use_gpu: bool = False
    cpus_per_worker: float | None = None  # None: 1 on CPU runs, GPU_CPUS_PER_WORKER on GPU runs
    placement: str = "PACK"         # Ray placement of the workers: PACK, SPREAD, STRICT_SPREAD (one per node)
    loader_workers: int | None = None  # DataLoader processes per rank; None: 0 on CPU, cpus_per_worker - 1 on GPU
    shuffle_buffer: int = 256
    checkpoint_every: int = 100     # steps
    keep_checkpoints: int = 2
    eval_every_epochs: int = 1
    eval_batch: int = 8
    eval_parts: tuple[str, ...] = ("val", "test")
    # The parts of the split trained on: [train, val] turns the 70/10/20 splits into 80/20
    # ones (the PMT-IQA public code's), reference-wise where the pack split by reference.
    train_parts: tuple[str, ...] = ("train",)
    max_failures: int = 2           # worker-group restarts from the latest checkpoint
    out_dir: str = "runs/train"
    name: str = "liqe"
    # datasets[].batch_size is each rank's mini-batch (false: the global batch grows with the
    # workers) or the global one, divided over the workers (true: the paper's sizes at any scale)
    batch_is_global: bool = False
    # The best step is chosen on the mean val SRCC (val), or on the test SRCC as the PMT-IQA
    # public code reports its figure (test: optimistic, the test part picks the step it reports).
    # None: val when eval_parts has it, else the latest evaluated step.
    selection: Literal["val", "test"] | None = None

    def __post_init__(self) -> None:
        # frozen: fill what the model family's recipe decides, once
        object.__setattr__(self, "optim", family_optim(self.optim, self.model))
        if hasattr(self.model, "bind_data"):
            object.__setattr__(self, "model", self.model.bind_data(self.datasets))
        if not self.train_parts or set(self.train_parts) - {"train", "val"} or "train" not in self.train_parts:
            raise ValueError(f"train_parts: expected train and optionally val, got {list(self.train_parts)}")
        if self.epoch_length not in ("steps", "pass"):
            raise ValueError(f"epoch_length must be steps or pass, got {self.epoch_length!r}")
        if self.epoch_length == "pass":
            object.__setattr__(self, "steps_per_epoch", steps_per_pass(self.rank_datasets, self.split,
                                                                       max(1, self.workers), self.train_parts))
        if self.selection is not None and self.selection not in ("val", "test"):
            raise ValueError(f"selection must be val or test, got {self.selection!r}")
        if self.selection is not None and self.selection not in self.eval_parts:
            raise ValueError(f"selection: the best step is chosen on {self.selection}, which eval_parts "
                             f"({list(self.eval_parts)}) does not evaluate")
        if getattr(self.model, "crop_size", self.crops.size) != self.crops.size:
            raise ValueError(f"crops.size ({self.crops.size}) must equal model.crop_size ({self.model.crop_size})")
        if self.weighting.method == "progressive":
            for key in ("easy", "hard"):
                task = getattr(self.weighting, key)
                if task not in self.model.loss_tasks:
                    raise ValueError(f"weighting.{key}: task {task!r} is not one this model trains "
                                     f"({', '.join(self.model.loss_tasks)})")
        if self.weighting.method == "fixed" and set(self.weighting.weights) != set(self.model.loss_tasks):
            raise ValueError(f"weighting.weights must give every task this model trains "
                             f"({', '.join(self.model.loss_tasks)}), got {sorted(self.weighting.weights)}")
        if not self.datasets:
            raise ValueError("datasets: at least one dataset is needed")
        for d in self.datasets:
            d.crop_rules(self.crops)  # a resize that cannot be cropped fails here, naming the dataset
        names = [d.name for d in self.datasets]
        if len(set(names)) != len(names):
            raise ValueError(f"datasets: names must be unique, got {names}")
        for key in ("steps_per_epoch", "workers", "checkpoint_every", "eval_batch"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")
        for key in ("loader_workers", "max_failures", "keep_checkpoints"):
            if getattr(self, key) is not None and getattr(self, key) < 0:
                raise ValueError(f"{key} must be >= 0, got {getattr(self, key)}")
        if self.shuffle_buffer < 1 or self.eval_every_epochs < 1:
            raise ValueError("shuffle_buffer and eval_every_epochs must be >= 1")
        if self.cpus_per_worker is not None and not self.cpus_per_worker > 0:
            raise ValueError(f"cpus_per_worker must be > 0, got {self.cpus_per_worker}")
        if self.epochs < 0:
            raise ValueError(f"epochs must be >= 0 (0: evaluate without training), got {self.epochs}")
        if not 0 <= self.split < 10:
            raise ValueError(f"split must be 0..9, got {self.split}")
        if self.placement not in ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"):
            raise ValueError(f"placement must be PACK, SPREAD, STRICT_PACK or STRICT_SPREAD, got {self.placement!r}")
        bad = set(self.eval_parts) - {"val", "test"}
        if bad:
            raise ValueError(f"eval_parts: unknown part(s) {sorted(bad)}")
        trained = sorted(set(self.eval_parts) & set(self.train_parts))
        if trained:
            raise ValueError(f"eval_parts: {trained[0]} is trained on (train_parts); evaluate the parts held out")
        plain_name(self.name, "name")
        if self.batch_is_global:
            for d in self.datasets:
                if d.batch_size % self.workers:
                    raise ValueError(f"datasets.{d.name}.batch_size: {d.batch_size} images is the global batch "
                                     f"(batch_is_global: true) and does not divide over {self.workers} workers")

    @property
    def selection_part(self) -> str:
        """The part the best step is chosen on (``selection``, or val by default)."""
        return self.selection or "val"

    @property
    def rank_datasets(self) -> list[DatasetSpec]:
        """The datasets with each rank's mini-batch size (the global one divided by the workers
        when ``batch_is_global``)."""
        if not self.batch_is_global:
            return list(self.datasets)
        return [replace(d, batch_size=d.batch_size // self.workers) for d in self.datasets]

    def describe_batches(self) -> str:
        """One line: the global mini-batch of every dataset and how it is split over the ranks."""
        return "global batch per step: " + ", ".join(
            f"{d.name} {d.batch_size * self.workers} ({self.workers} worker(s) x {d.batch_size})"
            for d in self.rank_datasets)

    @property
    def resolved_cpus_per_worker(self) -> float:
        """CPUs Ray reserves per rank: one decoding process feeds ~120 crops/s, a GPU takes
        thousands, so GPU ranks get several loader processes."""
        if self.cpus_per_worker is not None:
            return self.cpus_per_worker
        return GPU_CPUS_PER_WORKER if self.use_gpu else 1.0

    @property
    def resolved_loader_workers(self) -> int:
        """DataLoader processes per rank (training and evaluation)."""
        if self.loader_workers is not None:
            return self.loader_workers
        return max(1, int(self.resolved_cpus_per_worker) - 1) if self.use_gpu else 0

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch

    @property
    def run_dir(self) -> str:
        return f"{self.out_dir}/{self.name}"


#: ``optim`` knobs a family may decide (``model.optim_defaults``) and their value otherwise.
OPTIM_FALLBACKS = {"step_delay_epochs": 0, "reset_each_epoch": False}


def family_optim(optim: OptimConfig, model) -> OptimConfig:
    """``optim`` with its null knobs filled: the schedule by the model family
    (``model.default_schedule``), the rest by its recipe (``model.optim_defaults``) or
    :data:`OPTIM_FALLBACKS`."""
    defaults = {**OPTIM_FALLBACKS, **getattr(model, "optim_defaults", {}), "schedule": model.default_schedule}
    fill = {k: v for k, v in defaults.items() if getattr(optim, k) is None}
    return replace(optim, **fill) if fill else optim


def steps_per_pass(datasets: list[DatasetSpec], split: int, workers: int, parts: tuple[str, ...] = ("train",)) -> int:
    """Steps of one pass over the train split: the largest ``ceil(train images / global
    batch)`` over the datasets (the public code's epoch; its loader keeps the last, smaller
    batch), from each shard manifest's split counts. The stream never yields a short batch: the
    last step of an epoch is filled from the next pass, so an epoch sees one pass give or take
    a batch."""
    from liqe_dist.data.packing import read_manifest

    steps = 1
    for d in datasets:
        try:
            counts = read_manifest(Path(d.shards))["splits"]["counts"][split]
            n = sum(counts[p] for p in parts)
        except (OSError, KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"epoch_length: pass needs datasets.{d.name}'s {'+'.join(parts)} count of split {split} "
                             f"from {d.shards}/manifest.json ({type(exc).__name__}: {exc})") from None
        steps = max(steps, math.ceil(n / (d.batch_size * workers)))
    return steps


#: What a resumed run may change (anything else is refused, naming the key): where and how
#: often it writes, how its work is placed on the machines, and its length, which may grow
#: (``epochs``: the cosine schedule and the progressive weights then stretch to the new length
#: from the resumed step). Each changes no number the run has computed so far.
RESUME_SAFE_KEYS = ("eval_every_epochs", "checkpoint_every", "keep_checkpoints", "max_failures", "loader_workers",
                    "cpus_per_worker", "placement", "out_dir", "name")


def resolved_config(cfg: TrainConfig) -> dict:
    """``cfg`` as plain data with its run folder and shard sets as absolute paths (what a run
    folder records, what Ray workers receive: they start in folders of their own)."""
    out = json.loads(json.dumps(to_dict(cfg)))  # tuples as lists: as the YAML file reads back
    out["out_dir"] = str(Path(cfg.out_dir).resolve())
    for d in out["datasets"]:
        d["shards"] = str(Path(d["shards"]).resolve())
    return out


def with_missing_keys(recorded, defaults):
    """``recorded`` with the keys it lacks taken from ``defaults`` (mappings and lists of equal
    length walked item by item); a recorded value always wins."""
    if isinstance(recorded, dict) and isinstance(defaults, dict):
        return {**{k: v for k, v in defaults.items() if k not in recorded},
                **{k: with_missing_keys(v, defaults.get(k)) for k, v in recorded.items()}}
    if isinstance(recorded, list) and isinstance(defaults, list) and len(recorded) == len(defaults):
        return [with_missing_keys(r, d) for r, d in zip(recorded, defaults)]
    return recorded


def resume_changes(old: dict, new: dict) -> list[str]:
    """The changes from the recorded config ``old`` to ``new`` that a resumed run refuses
    (``dotted.key: old -> new``); empty when it may go on. A key the record lacks (written by a
    version before the key existed) counts as its default; every recorded value is compared as
    recorded (facts derived from the data, such as a pass's steps, included: a repacked set shows)."""
    from liqe_dist.config import ConfigError, from_dict

    try:
        old = with_missing_keys(old, resolved_config(from_dict(TrainConfig, old)))
    except (ConfigError, ValueError, TypeError, KeyError, OSError):
        pass  # a record this version cannot read (a removed key): compared as it is
    changes = [c for c in describe_changes(old, new) if c.split(":", 1)[0] not in RESUME_SAFE_KEYS]
    if old.get("epochs") is not None and new["epochs"] >= old["epochs"]:
        changes = [c for c in changes if not c.startswith("epochs:")]
    return changes
