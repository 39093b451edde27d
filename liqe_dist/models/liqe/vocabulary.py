"""LIQE's vocabulary: quality levels, the templates, and the prompts built from the label sets.

The order of every list is part of the model: released LIQE checkpoints were trained with the
reference code's strings, and the joint index of a (quality, scene, distortion) triple is
``c * S * D + s * D + d`` (itertools.product order). With the default vocabulary that is
``c * 99 + s * 11 + d`` over 495 prompts.

Ablations of the paper (Tables 4 and 5) are vocabularies too: two quality levels, a task left
out (its axis then has size 1 and its words drop out of the template), or ablation (4), three
separate templates (``separate=True``): C + S + D prompts, one softmax per task.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from liqe_dist.data.labels import DISTORTIONS, SCENES, coarse_distortion

QUALITIES: tuple[str, ...] = ("bad", "poor", "fair", "good", "perfect")
#: LIQE's tasks, in the order of the joint index and of the loss terms.
TASKS: tuple[str, str, str] = ("quality", "scene", "distortion")

# Templates of the reference code, keyed by which tasks are on (quality, scene, distortion).
TEMPLATES: dict[tuple[bool, bool, bool], str] = {
    (True, True, True): "a photo of a {s} with {d} artifacts, which is of {c} quality",
    (True, True, False): "a photo of a {s}, which is of {c} quality",
    (True, False, True): "a photo with {d} artifacts, which is of {c} quality",
    (True, False, False): "a photo with {c} quality",
    (False, True, True): "a photo of a {s} with {d} artifacts",
    (False, True, False): "a photo of a {s}",
    (False, False, True): "a photo with {d} artifacts",
}


@dataclass(frozen=True)
class Vocabulary:
    """Labels of the three tasks and the template that joins them into prompts.

    A task that is off has an empty tuple; its axis in the joint distribution has size 1.
    """

    qualities: tuple[str, ...] = QUALITIES
    scenes: tuple[str, ...] = SCENES
    distortions: tuple[str, ...] = DISTORTIONS
    separate: bool = False  # ablation (4): one template and one softmax per task

    def __post_init__(self) -> None:
        if not (self.qualities or self.scenes or self.distortions):
            raise ValueError("a vocabulary needs at least one task")
        for field, labels in (("qualities", self.qualities), ("scenes", self.scenes),
                              ("distortions", self.distortions)):
            if len(set(labels)) != len(labels):
                raise ValueError(f"vocabulary {field} has duplicate labels: {labels}")

    @classmethod
    def for_tasks(cls, quality: bool = True, scene: bool = True, distortion: bool = True,
                  levels: int = 5, separate: bool = False) -> "Vocabulary":
        """The default vocabulary restricted to some tasks; ``levels=2`` is the C = 2 ablation."""
        if levels == 5:
            qualities = QUALITIES
        elif levels == 2:
            qualities = ("bad", "good")
        else:
            raise ValueError(f"quality levels must be 5 or 2 (the paper's ablation), got {levels}")
        return cls(qualities if quality else (), SCENES if scene else (),
                   DISTORTIONS if distortion else (), separate=separate)

    @property
    def tasks(self) -> tuple[bool, bool, bool]:
        """Which of :data:`TASKS` are on."""
        return bool(self.qualities), bool(self.scenes), bool(self.distortions)

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, S, D) with 1 for a task that is off."""
        return max(len(self.qualities), 1), max(len(self.scenes), 1), max(len(self.distortions), 1)

    @property
    def size(self) -> int:
        """Number of prompts: C * S * D (joint template) or the sum over tasks that are on (separate)."""
        if self.separate:
            return len(self.qualities) + len(self.scenes) + len(self.distortions)
        c, s, d = self.shape
        return c * s * d

    @property
    def template(self) -> str:
        return TEMPLATES[self.tasks]

    def prompts(self) -> list[str]:
        """All prompts, index ``c * S * D + s * D + d`` (product order of the reference); with
        ``separate``, the quality prompts, then the scene prompts, then the distortion prompts."""
        if self.separate:
            return ([TEMPLATES[True, False, False].format(c=c) for c in self.qualities]
                    + [TEMPLATES[False, True, False].format(s=s) for s in self.scenes]
                    + [TEMPLATES[False, False, True].format(d=d) for d in self.distortions])
        template = self.template
        return [template.format(c=c, s=s, d=d) for c, s, d in itertools.product(
            self.qualities or ("",), self.scenes or ("",), self.distortions or ("",))]

    def index(self, c: int, s: int, d: int) -> int:
        """Joint index of level/scene/distortion indices (0-based; 0 for a task that is off)."""
        C, S, D = self.shape
        if not (0 <= c < C and 0 <= s < S and 0 <= d < D):
            raise IndexError(f"(c={c}, s={s}, d={d}) outside the vocabulary shape {(C, S, D)}")
        return (c * S + s) * D + d

    def unindex(self, index: int) -> tuple[int, int, int]:
        """Inverse of :meth:`index`."""
        C, S, D = self.shape
        if not 0 <= index < C * S * D:
            raise IndexError(f"joint index {index} outside 0..{C * S * D - 1}")
        c, rest = divmod(index, S * D)
        s, d = divmod(rest, D)
        return c, s, d

    def quality_values(self) -> tuple[float, ...]:
        """Numeric value of each quality level: 1..C (eq. 1)."""
        return tuple(float(i + 1) for i in range(len(self.qualities)))

    def scene_index(self, name: str) -> int:
        if name not in self.scenes:
            raise KeyError(f"unknown scene {name!r}; known: {', '.join(self.scenes)}")
        return self.scenes.index(name)

    def distortion_index(self, name: str) -> int:
        """Index of a coarse class, accepting fine names through :func:`coarse_distortion`."""
        coarse = name if name in self.distortions else coarse_distortion(name)
        return self.distortions.index(coarse)


DEFAULT_VOCABULARY = Vocabulary()
