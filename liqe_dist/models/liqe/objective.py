"""The multitask objective of one step, over the global batch of all ranks (eqs. 2-10).

Each rank encodes its own images and only its slice of the prompts; prompt embeddings and
per-image logits are all-gathered with autograd, so every rank forms the same quality pairs
(within each dataset, across ranks) and the same global means, and computes the identical loss.
See :mod:`liqe_dist.dist.collectives` for why the resulting gradients are exact.

Embeddings, cosines and logits are float32 whatever the towers compute in, so the gathers and
their backward all-reduces carry float32 (see :meth:`LIQE.encode_images`). Gather sizes are
known (the prompts' from :func:`shard_range`, the images' from the config), so a step needs no
size exchange and no host read before backward.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from liqe_dist.dist.collectives import all_gather_cat, all_gather_cat_nograd, exchange_sizes, rank, shard_range, world_size
from liqe_dist.models.base import LossTerm
from liqe_dist.models.liqe.losses import PAPER, LossConfig, distortion_loss, quality_loss, scene_loss
from liqe_dist.models.liqe.vocabulary import TASKS

if TYPE_CHECKING:
    from liqe_dist.models.liqe.model import LIQE, LIQEOutput


def prompt_embeddings(model: LIQE, shard: bool = True) -> torch.Tensor | None:
    """All V prompt embeddings ``[V, K]``; with ``shard`` each rank encodes V/W of them and the
    pieces are all-gathered (differentiably). None for a model without prompts (linear head)."""
    if not model.uses_prompts:
        return None
    if not shard or world_size() == 1:
        return model.encode_prompts()
    v, w = model.prompt_tokens.shape[0], world_size()
    sizes = [b - a for a, b in (shard_range(v, w, r) for r in range(w))]
    start, stop = shard_range(v, w, rank())
    return all_gather_cat(model.encode_prompts(start, stop), sizes)


def global_outputs(model: LIQE, images: torch.Tensor, text_emb: torch.Tensor | None,
                   rank_sizes: list[int] | None = None) -> LIQEOutput:
    """Predictions for the images of every rank ``[B_global, ...]`` (rank order); ``rank_sizes``:
    images per rank when known."""
    local = model.logits(model.encode_images(images), text_emb)
    return model.predictions(all_gather_cat(local, rank_sizes))


def gather_labels(batch: dict, rank_sizes: list[int] | None = None) -> dict[str, torch.Tensor]:
    """The label tensors of every rank's batch, concatenated in rank order."""
    names = ("dataset", "mos", "has_mos", "scenes", "has_scenes", "distortion", "has_distortion")
    return {n: all_gather_cat_nograd(batch[n], rank_sizes) for n in names}


def task_losses(out: LIQEOutput, labels: dict[str, torch.Tensor], tasks: tuple[str, ...],
                loss: LossConfig = PAPER) -> dict[str, LossTerm]:
    """The loss terms (sums and counts) of the tasks that are on, over the global batch."""
    terms = {}
    if "quality" in tasks:
        terms["quality"] = quality_loss(out.score, labels["mos"], labels["dataset"], labels["has_mos"], loss)
    if "scene" in tasks:
        terms["scene"] = scene_loss(out.scene, labels["scenes"], labels["has_scenes"], loss.fidelity_eps)
    if "distortion" in tasks:
        terms["distortion"] = distortion_loss(out.distortion, labels["distortion"], labels["has_distortion"],
                                              loss.fidelity_eps)
    return terms


def step_losses(model: LIQE, batch: dict, tasks: tuple[str, ...] = TASKS, shard_prompts: bool = True,
                text_emb: torch.Tensor | None = None, loss: LossConfig = PAPER,
                rank_sizes: list[int] | None = None) -> tuple[dict[str, LossTerm], LIQEOutput]:
    """Loss terms and global predictions for one step. ``text_emb`` (e.g. precomputed for a frozen
    text encoder) replaces the prompt encoding. ``rank_sizes``: every rank's number of images
    (training knows it from the config); None exchanges them once."""
    if text_emb is None:
        text_emb = prompt_embeddings(model, shard_prompts)
    if rank_sizes is None and world_size() > 1:
        rank_sizes = exchange_sizes(batch["images"].shape[0], batch["images"].device)
    out = global_outputs(model, batch["images"], text_emb, rank_sizes)
    return task_losses(out, gather_labels(batch, rank_sizes), tasks, loss), out
