"""The model families the system trains, evaluates and scores: ``model.family -> FamilySpec``.

A new family is a subpackage of :mod:`liqe_dist.models` with a config dataclass (whose
``family`` field is a one-value ``Literal``), an :class:`~liqe_dist.models.base.IQAModel`, and a
``spec.py`` defining ``SPEC``; add its name and module to :data:`FAMILY_MODULES` and its config
to :data:`ModelConfig`. Nothing else in the system names a family.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable, Union

from liqe_dist.models.liqe.config import LIQEConfig
from liqe_dist.models.pmt_iqa.config import PMTIQAConfig

#: The ``model:`` section of a training config: one family's config, chosen by ``family``.
ModelConfig = Union[LIQEConfig, PMTIQAConfig]

def default_model_config() -> ModelConfig:
    """The ``model:`` section when a config has none: LIQE's defaults."""
    return LIQEConfig()


FAMILY_MODULES = {"liqe": "liqe_dist.models.liqe.spec", "pmt_iqa": "liqe_dist.models.pmt_iqa.spec"}


@dataclass(frozen=True)
class FamilySpec:
    """How to make one family's models.

    ``build(cfg)``: a new model from its config section (weights from ``cfg.checkpoint`` or
    ``cfg.pretrained`` when given). ``from_weights(state, meta, path, **options)``: the model a
    weight file holds (see :func:`liqe_dist.models.weights.load_weights`). ``model``: its
    :class:`~liqe_dist.models.base.IQAModel` class (what a family decides before a model exists,
    e.g. ``auto_bf16``).
    """

    name: str
    config: type
    build: Callable
    from_weights: Callable
    model: type


def get_family(name: str, where: str = "model.family") -> FamilySpec:
    """The spec of family ``name``; an unknown name is an error listing the known ones."""
    if name not in FAMILY_MODULES:
        raise ValueError(f"{where}: unknown model family {name!r} (known: {', '.join(FAMILY_MODULES)})")
    return importlib.import_module(FAMILY_MODULES[name]).SPEC


def build_model(cfg: ModelConfig):
    """The model ``cfg`` describes (its family's :attr:`FamilySpec.build`), in ``cfg.precision``."""
    return get_family(cfg.family).build(cfg)


def load_model(checkpoint: str | None = None, name: str | None = None, pretrained: str | None = None,
               precision: str = "fp32", requested: str | None = None):
    """A model to score or evaluate with: the weight file ``checkpoint`` of any family (read
    from the file; ``name`` names the architecture of OpenAI-format LIQE files, ViT-B-32 by
    default), or else LIQE ``name`` (ViT-B-32) with open_clip's ``pretrained`` weights (random
    without), in ``precision``. ``requested``: the precision the user asked for; when it was
    ``auto``, a family that scores in fp32 only (``IQAModel.auto_bf16`` false) stays fp32."""
    if checkpoint is not None:
        from liqe_dist.models.base import PRECISIONS
        from liqe_dist.models.weights import load_weights

        if pretrained:
            raise ValueError("give a checkpoint or pretrained weights, not both")
        model = load_weights(checkpoint, **({"model_name": name} if name else {}))
        if requested == "auto" and not model.auto_bf16:
            precision = "fp32"
        return model.to(PRECISIONS[precision])
    return build_model(LIQEConfig(name=name or "ViT-B-32", pretrained=pretrained, precision=precision))
