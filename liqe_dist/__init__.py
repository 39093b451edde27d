"""liqe-dist: distributed training and evaluation of blind image quality models (LIQE, PMT-IQA).

Quick use in a notebook::

    import liqe_dist
    scorer = liqe_dist.load(checkpoint="LIQE.pt")          # released LIQE weights (ViT-B/32)
    scorer.score(["a.jpg", "b.png"])                        # -> [ImageScore(quality=3.71, ...), ...]
"""

from __future__ import annotations

__version__ = "0.1.0"


def load(name: str | None = None, checkpoint: str | None = None, pretrained: str | None = None,
         precision: str = "fp32", device: str = "auto", batch_images: int | None = None):
    """A :class:`liqe_dist.eval.scoring.Scorer` for a model.

    ``checkpoint``: a local weights file: a project ``.safetensors`` of any family (LIQE,
    PMT-IQA: read from the file), the released LIQE ``.pt``, pyiqa's ``liqe_mix.pt``;
    ``pretrained``: an open_clip tag such as ``openai`` (downloaded by open_clip) for LIQE
    ``name`` (default ViT-B-32); neither: random weights (useful only for tests).
    ``precision``: fp32 (the default: the same scores on every machine), bf16, or ``auto``
    (bf16 where ``device`` computes it natively, else fp32: faster, and the scores then depend
    on the machine). ``device``: ``auto`` (the GPU when there is one), ``cpu`` or ``cuda[:N]``.
    ``batch_images``: images per forward pass (default: as ``liqe-dist score``, 2 on the CPU,
    16 on a GPU).
    """
    from liqe_dist.eval.scoring import Scorer
    from liqe_dist.hardware import resolve_device, resolve_precision
    from liqe_dist.models.registry import load_model

    device = resolve_device(device)
    model = load_model(checkpoint, name, pretrained, resolve_precision(precision, str(device)), requested=precision)
    return Scorer(model, batch_images=batch_images, device=device)
