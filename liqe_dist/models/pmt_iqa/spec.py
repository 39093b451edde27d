"""The PMT-IQA family's registry entry."""

from __future__ import annotations

import torch

from liqe_dist.models.base import PRECISIONS
from liqe_dist.models.pmt_iqa.config import PMTIQAConfig
from liqe_dist.models.pmt_iqa.model import PMTIQA
from liqe_dist.models.pmt_iqa.weights import from_weights, training_options
from liqe_dist.models.registry import FamilySpec



def imagenet_backbone_state(backbone: str) -> dict[str, torch.Tensor]:
    """torchvision's ImageNet weights of ``backbone`` (IMAGENET1K_V1: the ones the public code
    loads; torchvision downloads them on first use), classifier removed."""
    import torchvision

    ctor = getattr(torchvision.models, backbone)
    state = ctor(weights="IMAGENET1K_V1").state_dict()
    return {k: v for k, v in state.items() if not k.startswith("fc.")}


def build(cfg: PMTIQAConfig) -> PMTIQA:
    """PMT-IQA as ``cfg`` describes it: weights from ``cfg.checkpoint``, or an ImageNet backbone
    (``pretrained: imagenet``) with new heads, or random."""
    if cfg.checkpoint:
        from liqe_dist.models.weights import load_weights

        model = load_weights(cfg.checkpoint, family="pmt_iqa", **training_options(cfg))
        if (model.cfg.backbone, model.cfg.width) != (cfg.backbone, cfg.width):
            raise ValueError(f"model.checkpoint {cfg.checkpoint}: holds a {model.cfg.backbone} of width "
                             f"{model.cfg.width}, the config asks for {cfg.backbone} of width {cfg.width}")
    else:
        model = PMTIQA(cfg)
        if cfg.pretrained == "imagenet":
            model.backbone.load_state_dict(imagenet_backbone_state(cfg.backbone), strict=True)
    return model.to(PRECISIONS[cfg.precision])


SPEC = FamilySpec(name="pmt_iqa", config=PMTIQAConfig, build=build, from_weights=from_weights, model=PMTIQA)
