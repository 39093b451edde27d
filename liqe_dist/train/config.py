"""The typed configuration of a training run (``liqe-dist train --config FILE.yaml``)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from liqe_dist.data.crops import CropConfig
from liqe_dist.data.stream import DatasetSpec
from liqe_dist.dist.engine import OptimConfig
from liqe_dist.models.registry import ModelConfig, default_model_config
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
    max_failures: int = 2           # worker-group restarts from the latest checkpoint
    out_dir: str = "runs/train"
    name: str = "liqe"

    def __post_init__(self) -> None:
        if self.optim.schedule is None:  # frozen: fill the family's default schedule once
            object.__setattr__(self, "optim", replace(self.optim, schedule=self.model.default_schedule))
        if getattr(self.model, "crop_size", self.crops.size) != self.crops.size:
            raise ValueError(f"crops.size ({self.crops.size}) must equal model.crop_size ({self.model.crop_size})")
        if self.weighting.method == "progressive":
            for key in ("easy", "hard"):
                task = getattr(self.weighting, key)
                if task not in self.model.loss_tasks:
                    raise ValueError(f"weighting.{key}: task {task!r} is not one this model trains "
                                     f"({', '.join(self.model.loss_tasks)})")
        if not self.datasets:
            raise ValueError("datasets: at least one dataset is needed")
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
