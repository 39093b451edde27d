"""PMT-IQA weight files: the state dict plus its architecture (the config fields in
:data:`~liqe_dist.models.pmt_iqa.model.ARCHITECTURE`), checked before anything is allocated."""

from __future__ import annotations

import dataclasses
import json

import torch

from liqe_dist.models.pmt_iqa.config import PMTIQAConfig
from liqe_dist.models.pmt_iqa.model import ARCHITECTURE, PMTIQA
from liqe_dist.models.weights import FORMAT, CheckpointError, check_fits

MAX_PARAMETERS = 1_000_000_000
MAX_TRUNK = 8  # layers; each at most MAX_WIDTH features
MAX_WIDTH = 16384


def architecture(meta: dict[str, str], path) -> dict:
    """The architecture a file's metadata records, type- and bound-checked."""
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: PMT-IQA weights must be a liqe-dist .safetensors file (its metadata "
                              "records the architecture)")
    try:
        arch = json.loads(meta["architecture"])
        if not isinstance(arch, dict) or set(arch) != set(ARCHITECTURE):
            raise ValueError(f"expected the keys {list(ARCHITECTURE)}")
        for key in ("width", "crop_size", "stage_features", "feature_size", "classes"):
            if isinstance(arch[key], bool) or not isinstance(arch[key], int) or not 1 <= arch[key] <= MAX_WIDTH:
                raise ValueError(f"{key} = {arch[key]!r} is not an integer in 1..{MAX_WIDTH}")
        sizes = arch["trunk_sizes"]
        if (not isinstance(sizes, list) or not 1 <= len(sizes) <= MAX_TRUNK
                or not all(isinstance(s, int) and not isinstance(s, bool) and 1 <= s <= MAX_WIDTH for s in sizes)):
            raise ValueError(f"trunk_sizes = {sizes!r} is not a list of 1..{MAX_TRUNK} sizes up to {MAX_WIDTH}")
        arch["trunk_sizes"] = tuple(sizes)
        PMTIQAConfig(**arch)  # the config's own checks (backbone name, sizes that fit together)
    except (KeyError, ValueError, TypeError) as exc:
        raise CheckpointError(f"{path}: malformed PMT-IQA metadata ({type(exc).__name__}: {exc})") from None
    return arch


def from_weights(state: dict[str, torch.Tensor], meta: dict[str, str], path, **options) -> PMTIQA:
    """PMT-IQA from a weight file's tensors and metadata; ``options``: training-only config
    fields (``frozen_bn``)."""
    unknown = set(options) - set(training_options(PMTIQAConfig()))
    if unknown:
        raise CheckpointError(f"{path}: holds a PMT-IQA model; {', '.join(sorted(unknown))} apply to LIQE only")
    cfg = PMTIQAConfig(**architecture(meta, path), **options)
    with torch.device("meta"):
        skeleton = PMTIQA(cfg)
    size = sum(p.numel() for p in skeleton.parameters())
    if size > MAX_PARAMETERS:
        raise CheckpointError(f"{path}: architecture declares {size:,} parameters (limit {MAX_PARAMETERS:,})")
    check_fits(skeleton, state, path, f"PMT-IQA {cfg.backbone} of width {cfg.width}")
    model = PMTIQA(cfg)
    model.load_state_dict(state, strict=True)
    return model


def training_options(cfg: PMTIQAConfig) -> dict:
    """The config fields that are not architecture (they come from the run, not the file)."""
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)
            if f.name not in ARCHITECTURE and f.name not in ("family", "pretrained", "checkpoint", "precision")}
