"""The ``model:`` section of a PMT-IQA run (``model.family: pmt_iqa``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from liqe_dist.data.stream import DatasetSpec

#: PMT-IQA's loss terms: the easy task first (the progressive weighting's order).
TASKS = ("classification", "regression")

#: What each ``model.recipe`` stands for. ``paper``: the project's multi-dataset reading of the
#: paper (MOS scaled to [0, 1], classes as 10 equal bins of it); ``reference``: the public code
#: (github pqy000/PMT-IQA at e70c893), one dataset a run on its raw labels with its hand-made
#: class rules, lr / 10 after epochs 6, 12, 18 (0-based; one epoch later than StepLR's), Adam
#: re-created every epoch. A knob given explicitly overrides its recipe value.
RECIPES: dict[str, dict] = {
    "paper": {"target_scale": "unit", "class_rule": "unit_bins"},
    "reference": {"target_scale": "raw", "class_rule": "per_dataset"},
}
#: The optimiser knobs (``optim.*``) each recipe stands for, filled where the config leaves them null.
OPTIM_RECIPES: dict[str, dict] = {
    "paper": {"schedule": "step", "step_delay_epochs": 0, "reset_each_epoch": False},
    "reference": {"schedule": "step", "step_delay_epochs": 1, "reset_each_epoch": True},
}


@dataclass(frozen=True)
class PMTIQAConfig:
    """PMT-IQA (Pan et al.): a ResNet backbone, multi-scale features, a regression and a
    quality-class head. Defaults are the public code's (``MultiTaskIQANet(28, 112, 112, 56, 28, 14, 10)``).

    ``pretrained``: ``imagenet`` loads torchvision's ImageNet ResNet weights (downloaded by
    torchvision on the user's machine), None: random. ``checkpoint``: a project weights file.
    ``width``: the backbone's base width (64 is ResNet-50's; tests use 8). ``crop_size``: the
    side of the square crops the model is built for (its stage poolings are 7x7 windows: 224
    gives 8x8, 4x4, 2x2, 1x1 cells; at least 224). ``frozen_bn``: batch norm uses its running
    statistics and its affine parameters stay fixed while training (the usual choice when
    fine-tuning a pretrained ResNet with small batches); False: it normalises with the
    statistics of the global batch (exact under data parallelism). ``recipe``: ``paper`` or
    ``reference`` (the public code's regime, :data:`RECIPES`), which sets ``target_scale`` and
    ``class_rule`` (see :mod:`.targets`) and the optimiser knobs of :data:`OPTIM_RECIPES` unless
    they are given. ``target_range`` and ``class_datasets`` are facts of the training data, filled
    by :meth:`bind_data`.
    """

    family: Literal["pmt_iqa"] = "pmt_iqa"
    backbone: Literal["resnet50", "resnet18"] = "resnet50"
    pretrained: Literal["imagenet"] | None = None
    checkpoint: str | None = None
    width: int = 64
    crop_size: int = 224
    stage_features: int = 28        # each of stages 1-3 -> this many features (the paper's 28)
    feature_size: int = 112         # all four stages concatenated
    trunk_sizes: tuple[int, ...] = (112, 14)  # the shared FC trunk (LeakyReLU after each)
    classes: int = 10
    frozen_bn: bool = False
    precision: Literal["fp32", "bf16"] = "fp32"
    recipe: Literal["paper", "reference"] = "paper"
    target_scale: Literal["unit", "raw"] | None = None      # None: the recipe's
    class_rule: Literal["unit_bins", "per_dataset"] | None = None
    # Filled from the training data (:meth:`bind_data`), recorded with the run and the weights:
    target_range: tuple[float, float] | None = None   # raw: the label's (min, max), for predict's 1-5 map
    class_datasets: tuple[str, ...] | None = None     # per_dataset: each dataset id's packed dataset name

    def __post_init__(self) -> None:
        if self.recipe not in RECIPES:
            raise ValueError(f"model.recipe must be one of {list(RECIPES)}, got {self.recipe!r}")
        for knob, value in RECIPES[self.recipe].items():
            if getattr(self, knob) is None:
                object.__setattr__(self, knob, value)  # frozen: fill the recipe's value once
        if self.target_scale not in ("unit", "raw"):
            raise ValueError(f"model.target_scale must be unit or raw, got {self.target_scale!r}")
        if self.class_rule not in ("unit_bins", "per_dataset"):
            raise ValueError(f"model.class_rule must be unit_bins or per_dataset, got {self.class_rule!r}")
        if self.class_rule == "per_dataset" and self.classes != 10:
            raise ValueError(f"model.class_rule per_dataset is the public code's 10-class table; model.classes is "
                             f"{self.classes}")
        if self.target_range is not None:
            lo, hi = (float(v) for v in self.target_range)
            if not (lo == lo and hi == hi and hi > lo):
                raise ValueError(f"model.target_range must be (min, max) with max > min, got {list(self.target_range)}")
            object.__setattr__(self, "target_range", (lo, hi))
        if self.class_datasets is not None:
            object.__setattr__(self, "class_datasets", tuple(self.class_datasets))
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"model.precision must be one of ['fp32', 'bf16'], got {self.precision!r}")
        if self.backbone not in ("resnet50", "resnet18"):
            raise ValueError(f"model.backbone must be resnet50 or resnet18, got {self.backbone!r}")
        if self.pretrained not in (None, "imagenet"):
            raise ValueError(f"model.pretrained must be imagenet or null, got {self.pretrained!r}")
        if self.pretrained and self.width != 64:
            raise ValueError(f"model.width must be 64 with pretrained ImageNet weights, got {self.width}")
        if not 1 <= self.width <= 512:
            raise ValueError(f"model.width must be in 1..512, got {self.width}")
        if self.crop_size < 224:
            raise ValueError(f"model.crop_size must be >= 224 (stage 4 is pooled over 7x7 cells), got {self.crop_size}")
        if not (1 <= self.stage_features and self.feature_size > 3 * self.stage_features):
            raise ValueError(f"model.feature_size ({self.feature_size}) must exceed 3 x model.stage_features "
                             f"({self.stage_features}): stage 4 gets the rest")
        if not self.trunk_sizes or any(s < 1 for s in self.trunk_sizes):
            raise ValueError(f"model.trunk_sizes must be positive sizes, got {list(self.trunk_sizes)}")
        if not 2 <= self.classes <= 100:
            raise ValueError(f"model.classes must be in 2..100, got {self.classes}")
        if self.checkpoint is not None and not Path(self.checkpoint).is_file():
            raise ValueError(f"model.checkpoint: no such file {self.checkpoint!r}")

    @property
    def loss_tasks(self) -> tuple[str, ...]:
        return TASKS

    @property
    def default_schedule(self) -> str:
        return "step"  # the public code: lr / 10 every 6 epochs

    @property
    def optim_defaults(self) -> dict:
        """``optim`` knobs the recipe sets where the config leaves them null."""
        return OPTIM_RECIPES[self.recipe]

    def bind_data(self, datasets: "list[DatasetSpec]") -> "PMTIQAConfig":
        """This config with the facts its targets need from the training data: the label range
        (raw targets; one dataset a run, as the public code) and the packed dataset names (the
        per-dataset class rules). Raises ValueError naming the key when the data do not fit."""
        from liqe_dist.models.pmt_iqa.targets import bind_targets

        return bind_targets(self, datasets)

    @property
    def label(self) -> str:
        weights = (Path(self.checkpoint).name if self.checkpoint
                   else f"pretrained {self.pretrained}" if self.pretrained else "random")
        return f"pmt_iqa-{self.backbone} ({weights})"
