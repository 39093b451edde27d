"""The LIQE family's registry entry."""

from __future__ import annotations

from liqe_dist.models.liqe.config import LIQEConfig
from liqe_dist.models.base import PRECISIONS
from liqe_dist.models.liqe.model import LIQE, build_clip, set_logit_scale_trainable
from liqe_dist.models.liqe.weights import from_weights
from liqe_dist.models.registry import FamilySpec


def build(cfg: LIQEConfig) -> LIQE:
    """LIQE as ``cfg`` describes it (weights from ``cfg.checkpoint`` when given), configured for
    training with ``cfg.loss``, ``cfg.shard_prompts`` and ``cfg.freeze_text``."""
    if cfg.checkpoint:
        from liqe_dist.models.weights import load_weights

        model = load_weights(cfg.checkpoint, family="liqe", model_name=cfg.name, vocabulary=cfg.vocabulary(),
                             text_context=cfg.text_context, quick_gelu=cfg.quick_gelu)
    else:
        clip = build_clip(cfg.name, cfg.pretrained, cfg.quick_gelu)
        model = LIQE(clip, cfg.vocabulary(), text_context=cfg.text_context, head=cfg.head)
    set_logit_scale_trainable(model.clip, not cfg.freeze_logit_scale)
    model.configure_training(cfg.loss, cfg.shard_prompts, cfg.freeze_text)
    return model.to(PRECISIONS[cfg.precision])


SPEC = FamilySpec(name="liqe", config=LIQEConfig, build=build, from_weights=from_weights, model=LIQE)
