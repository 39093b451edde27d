"""PMT-IQA weight files: the state dict plus its architecture (the config fields in
:data:`~liqe_dist.models.pmt_iqa.model.ARCHITECTURE`), checked before anything is allocated."""

from __future__ import annotations

import dataclasses
import json

import torch

from liqe_dist.models.pmt_iqa.config import PMTIQAConfig
from liqe_dist.models.pmt_iqa.model import ARCHITECTURE, PMTIQA, TARGETS
from liqe_dist.models.weights import FORMAT, CheckpointError, check_fits

MAX_PARAMETERS = 1_000_000_000
NOT_OPTIONS = ("family", "pretrained", "checkpoint", "precision")  # config fields that are neither architecture nor options
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


def targets(meta: dict[str, str], path) -> dict:
    """The training targets a file records (none in files from before they were recorded: the
    unit scale)."""
    if "targets" not in meta:
        return {}
    try:
        out = json.loads(meta["targets"])
        if not isinstance(out, dict) or set(out) != set(TARGETS):
            raise ValueError(f"expected the keys {list(TARGETS)}")
        if out["target_scale"] not in ("unit", "raw"):
            raise ValueError(f"target_scale = {out['target_scale']!r}")
        r = out["target_range"]
        if r is not None and not (isinstance(r, list) and len(r) == 2
                                  and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in r)):
            raise ValueError(f"target_range = {r!r} is not [min, max]")
        out["target_range"] = None if r is None else tuple(float(v) for v in r)
        PMTIQAConfig(**out)
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"{path}: malformed PMT-IQA targets metadata ({type(exc).__name__}: {exc})") from None
    return out


def from_weights(state: dict[str, torch.Tensor], meta: dict[str, str], path, **options) -> PMTIQA:
    """PMT-IQA from a weight file's tensors and metadata; ``options``: training-only config
    fields (``frozen_bn``)."""
    unknown = set(options) - {f.name for f in dataclasses.fields(PMTIQAConfig)
                              if f.name not in ARCHITECTURE and f.name not in NOT_OPTIONS}
    if unknown:
        raise CheckpointError(f"{path}: holds a PMT-IQA model; {', '.join(sorted(unknown))} apply to LIQE only")
    cfg = PMTIQAConfig(**architecture(meta, path), **{**targets(meta, path), **options})
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
            if f.name not in ARCHITECTURE and f.name not in NOT_OPTIONS
            and not (f.name in TARGETS and getattr(cfg, f.name) is None)}  # unset: the file's
