"""What a model family is to the rest of the system: the one seam trainer, evaluation, scoring
and checkpoints talk through (open_clip's ``task/base_task.py`` pattern: the family computes its
own losses, so the loop never knows which family it trains).

A family's model is an :class:`IQAModel` (an ``nn.Module``):

* ``tasks``: the names of its loss terms, in the order the task weighting uses;
* ``training_losses(batch, rank_sizes)``: ``{task: LossTerm}`` over the *global* batch of all
  data-parallel ranks (sums and counts, so the mean is exact however the batch is split);
* ``predict(images)``: a :class:`Prediction`: quality on the 1-5 scale plus the label heads the
  family has (LIQE: scene and distortion probabilities);
* ``weights_state()`` / the family's ``from_weights``: what its weight file holds (tensors and
  string metadata; the family's name goes into the safetensors header, see
  :mod:`liqe_dist.models.weights`).

The registry (:mod:`liqe_dist.models.registry`) maps ``model.family`` to the family's config
type, builder and weight loader.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

#: ``model.precision`` -> the dtype a model's weights are cast to.
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class LossTerm:
    """``total``: sum of per-item losses (a graph-connected scalar); ``count``: items summed (a
    0-dim integer tensor on the same device: reading it would stall a GPU between forward and
    backward, so nothing here does). The mean over a global batch is ``total / count``."""

    total: torch.Tensor
    count: torch.Tensor

    @property
    def mean(self) -> torch.Tensor:
        return self.total / self.count.clamp_min(1)


@dataclass
class Prediction:
    """Predictions for B images, float32 whatever the model computes in.

    ``quality`` ``[B]`` on the 1-5 scale (LIQE's q_hat; other families map theirs onto it), so
    scores of different families compare like with like. ``heads``: ``name -> [B, K]``
    probabilities over the labels ``IQAModel.heads[name]`` (only heads the model has).
    """

    quality: torch.Tensor
    heads: dict[str, torch.Tensor] = field(default_factory=dict)


class IQAModel(nn.Module):
    """Base of every family's model. Subclasses set ``family`` and implement the methods below."""

    family: ClassVar[str] = ""
    #: Crops per image when scoring (``liqe-dist score``): the family's reference protocol.
    eval_crops: ClassVar[int] = 15
    #: Whether precision ``auto`` may score and evaluate this family in bf16 (False: fp32, a
    #: decision measured on trained weights by ``launch/bench_precision.py``).
    auto_bf16: ClassVar[bool] = True

    @property
    def crop_size(self) -> int:
        """Side of the square crops the model takes, px."""
        return 224

    @property
    def tasks(self) -> tuple[str, ...]:
        """Names of the loss terms :meth:`training_losses` returns (the weighting's tasks)."""
        raise NotImplementedError

    @property
    def heads(self) -> dict[str, tuple[str, ...]]:
        """Label heads of :meth:`predict`: ``name -> labels`` (index order of the probabilities)."""
        return {}

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the image tower computes in (its first parameter's: DeepSpeed's bf16 casts
        parameters, not buffers)."""
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def training_losses(self, batch: dict, rank_sizes: list[int] | None = None) -> dict[str, LossTerm]:
        """Loss terms over the global batch. ``batch``: this rank's batch (see
        :func:`liqe_dist.data.stream.collate`), on the model's device; ``rank_sizes``: every
        rank's number of images when known (None: exchanged)."""
        raise NotImplementedError

    def predict(self, images: torch.Tensor) -> Prediction:
        """uint8 crops ``[B, U, 3, H, W]`` -> :class:`Prediction` (mean over the U crops)."""
        raise NotImplementedError

    def weights_state(self, state: dict[str, torch.Tensor] | None = None
                      ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """(tensors, metadata) for the weight file. ``state``: ``state_dict()``-keyed tensors to
        write instead of the module's own (a bf16 run's float32 masters)."""
        raise NotImplementedError
