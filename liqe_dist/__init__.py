"""liqe-dist: distributed training and evaluation of LIQE-style blind image quality models.

Quick use in a notebook::

    import liqe_dist
    scorer = liqe_dist.load(checkpoint="LIQE.pt")          # released LIQE weights (ViT-B/32)
    scorer.score(["a.jpg", "b.png"])                        # -> [ImageScore(quality=3.71, ...), ...]
"""

from __future__ import annotations

__version__ = "0.1.0"


def load(name: str = "ViT-B-32", checkpoint: str | None = None, pretrained: str | None = None,
         precision: str = "auto", device: str = "auto", batch_images: int = 8):
    """A :class:`liqe_dist.scoring.Scorer` for a model.

    ``checkpoint``: a local weights file (project ``.safetensors``, the released LIQE ``.pt``,
    pyiqa's ``liqe_mix.pt``); ``pretrained``: an open_clip tag such as ``openai`` (downloaded by
    open_clip); neither: random weights (useful only for tests). ``precision``: ``auto`` (bf16
    where ``device`` computes it natively, else fp32), fp32 or bf16. ``device``: ``auto`` (the
    GPU when there is one), ``cpu`` or ``cuda[:N]``.
    """
    from .hardware import resolve_device, resolve_precision
    from .model import ModelConfig, build_model
    from .scoring import Scorer

    device = resolve_device(device)
    cfg = ModelConfig(name=name, checkpoint=checkpoint, pretrained=pretrained,
                      precision=resolve_precision(precision, str(device)))
    return Scorer(build_model(cfg), batch_images=batch_images, device=device)
