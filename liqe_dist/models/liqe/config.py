"""The ``model:`` section of a LIQE run (``model.family: liqe``, the default)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import open_clip

from liqe_dist.models.liqe.losses import LossConfig
from liqe_dist.models.liqe.model import resolve_quick_gelu  # importing the model registers the project configs
from liqe_dist.models.liqe.vocabulary import TASKS, Vocabulary


@dataclass(frozen=True)
class LIQEConfig:
    """Which CLIP to build and how LIQE uses and trains it.

    ``name``: an open_clip model name (``ViT-B-32``) or a project config (``liqe-tiny``).
    ``pretrained``: an open_clip tag (``openai``, needs a download on the user's machine) or None.
    ``checkpoint``: a local weights file (project safetensors, the released LIQE ``.pt``, or
    pyiqa's ``liqe_mix.pt``), loaded after building.
    ``loss``: the form of the fidelity losses (the paper's equations or the reference code's).
    ``freeze_text``: ablation (3), the text encoder frozen and the prompts encoded once.
    ``shard_prompts``: each data-parallel rank encodes V/W of the prompts (exact either way).
    """

    family: Literal["liqe"] = "liqe"
    name: str = "ViT-B-32"
    pretrained: str | None = None
    checkpoint: str | None = None
    quick_gelu: bool | None = None  # None: what the weights were trained with (resolve_quick_gelu)
    precision: Literal["fp32", "bf16"] = "fp32"
    freeze_logit_scale: bool = True
    text_context: Literal["cut", "full"] = "cut"
    quality_levels: int = 5
    tasks: tuple[str, ...] = TASKS
    separate_templates: bool = False  # ablation (4): one template and one softmax per task
    head: Literal["prompts", "linear"] = "prompts"  # "linear": ablation (6), image encoder + FC layer
    loss: LossConfig = field(default_factory=LossConfig)
    freeze_text: bool = False
    shard_prompts: bool = True

    def __post_init__(self) -> None:
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"model.precision must be one of ['fp32', 'bf16'], got {self.precision!r}")
        if self.head not in ("prompts", "linear"):
            raise ValueError(f"model.head must be 'prompts' or 'linear', got {self.head!r}")
        unknown = set(self.tasks) - set(TASKS)
        if unknown or not self.tasks:
            raise ValueError(f"model.tasks must be a non-empty subset of quality/scene/distortion, got {self.tasks}")
        if self.head == "linear" and tuple(self.tasks) != ("quality",):
            raise ValueError(f"model.head 'linear' (ablation 6) predicts quality only: set model.tasks to "
                             f"[quality], got {list(self.tasks)}")
        if self.quality_levels not in (2, 5):
            raise ValueError(f"model.quality_levels must be 5 or 2, got {self.quality_levels}")
        if self.checkpoint is not None and not Path(self.checkpoint).is_file():
            raise ValueError(f"model.checkpoint: no such file {self.checkpoint!r}")
        if self.name in open_clip.list_models():
            resolve_quick_gelu(self.name, self.pretrained, self.quick_gelu)
        elif self.checkpoint is None:  # a project checkpoint names its own architecture
            raise ValueError(f"model.name: unknown model {self.name!r} (open_clip names such as ViT-B-32, "
                             f"or a project config: liqe-tiny, liqe-tiny-rn, liqe-small)")

    @property
    def loss_tasks(self) -> tuple[str, ...]:
        """The loss terms this model trains, in the weighting's order."""
        return tuple(t for t in TASKS if t in self.tasks)

    @property
    def default_schedule(self) -> str:
        """The lr schedule ``optim.schedule: null`` means: the loss recipe's."""
        from liqe_dist.models.liqe.losses import RECIPES

        return RECIPES[self.loss.recipe]["schedule"]

    @property
    def label(self) -> str:
        """Short description for tables: architecture and weights."""
        weights = (Path(self.checkpoint).name if self.checkpoint
                   else f"pretrained {self.pretrained}" if self.pretrained else "random")
        return f"{self.name} ({weights})"

    def vocabulary(self) -> Vocabulary:
        return Vocabulary.for_tasks("quality" in self.tasks, "scene" in self.tasks,
                                    "distortion" in self.tasks, levels=self.quality_levels,
                                    separate=self.separate_templates)
