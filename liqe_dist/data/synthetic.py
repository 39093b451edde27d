"""A synthetic IQA dataset built offline: a pipeline check, not human opinion.

References are real photographs that ship with scikit-image, each given its scene label(s) by
hand below. Every coarse distortion class of LIQE is synthesised at 5 levels (the pristine
reference stands for "other"). Each image's full-reference score

    ssim = 100 * SSIM(reference, distorted)   (SSIM per RGB channel, averaged; 8-bit range)

falls as the level rises within each type (checked by the tests). The pseudo-MOS is its mean
over the references for the image's distortion and level (:func:`level_mos`): a score of the
distortion, not of the content, which a no-reference model can learn to predict on photographs
it has never seen. It says nothing about how people would rate the images.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter
from skimage import data as skdata
from skimage.metrics import structural_similarity

from liqe_dist.outputs import claim_dir

LEVELS = 5
#: Long side of the synthetic images, px (crops are 224, so a 512 px image gives a 3x10 grid).
IMAGE_SIDE = 512


@dataclass(frozen=True)
class Reference:
    """A pristine photograph. ``group`` ties near-identical photographs (a stereo pair) so that
    reference-wise splits never put one in training and the other in testing."""

    name: str
    scenes: tuple[str, ...]
    load: Callable[[], np.ndarray]
    group: str = ""

    @property
    def reference_id(self) -> str:
        return self.group or self.name


# The photographs scikit-image ships (no download), with scene labels given by hand: eight in
# colour, then six greyscale ones (used as RGB) for more variety of content and texture. The
# Hubble deep field is left out: a black frame with stars looks like an underexposed photograph
# to a no-reference model, so an SSIM pseudo-MOS of 100 for it is not learnable.
REFERENCES: tuple[Reference, ...] = (
    Reference("astronaut", ("human",), skdata.astronaut),
    Reference("chelsea", ("animal", "indoor"), skdata.chelsea),
    Reference("coffee", ("still_life", "indoor"), skdata.coffee),
    Reference("rocket", ("cityscape", "landscape"), skdata.rocket),
    Reference("motorcycle_left", ("still_life", "indoor"), lambda: skdata.stereo_motorcycle()[0], "motorcycle"),
    Reference("motorcycle_right", ("still_life", "indoor"), lambda: skdata.stereo_motorcycle()[1], "motorcycle"),
    Reference("retina", ("others",), skdata.retina),
    Reference("immunohistochemistry", ("others",), skdata.immunohistochemistry),
    Reference("camera", ("human", "landscape"), skdata.camera),
    Reference("moon", ("night", "landscape"), skdata.moon),
    Reference("coins", ("still_life",), skdata.coins),
    Reference("clock", ("still_life", "indoor"), skdata.clock),
    Reference("grass", ("plant",), skdata.grass),
    Reference("brick", ("others",), skdata.brick),
)


def _encode(img: Image.Image, fmt: str, **kwargs) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    buf.seek(0)
    out = Image.open(buf)
    out.load()
    return out.convert("RGB")


def _noise(img: Image.Image, level: int, rng: np.random.Generator) -> Image.Image:
    sigma = (0.02, 0.05, 0.09, 0.15, 0.25)[level - 1] * 255
    arr = np.asarray(img, dtype=np.float32) + rng.normal(0, sigma, (img.height, img.width, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def _spatial(img: Image.Image, level: int, rng: np.random.Generator) -> Image.Image:
    # KADID-style colour blocks: random 32 px squares of a random solid colour
    arr = np.asarray(img).copy()
    count = (4, 10, 20, 35, 60)[level - 1]
    size = 32
    for _ in range(count):
        t = rng.integers(0, max(1, img.height - size))
        l = rng.integers(0, max(1, img.width - size))
        arr[t:t + size, l:l + size] = rng.integers(0, 256, 3)
    return Image.fromarray(arr)


def _colour(img: Image.Image, level: int, rng: np.random.Generator) -> Image.Image:
    # a warm colour cast plus desaturation: changes colour even in nearly grey regions
    cast = (0.05, 0.10, 0.17, 0.26, 0.38)[level - 1]
    img = ImageEnhance.Color(img).enhance(1.0 - 2 * cast)
    arr = np.asarray(img, dtype=np.float32) * np.array([1 + cast, 1.0, 1 - cast], dtype=np.float32)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def _quantize(img: Image.Image, level: int, rng: np.random.Generator) -> Image.Image:
    colours = (48, 24, 12, 6, 3)[level - 1]
    return img.quantize(colours, dither=Image.Dither.NONE).convert("RGB")


DISTORTIONS: dict[str, Callable[[Image.Image, int, np.random.Generator], Image.Image]] = {
    "jpeg2000 compression": lambda img, lv, rng: _encode(
        img, "JPEG2000", quality_mode="rates", quality_layers=[(40, 80, 160, 320, 640)[lv - 1]]),
    "jpeg compression": lambda img, lv, rng: _encode(img, "JPEG", quality=(45, 25, 12, 7, 4)[lv - 1]),
    "noise": _noise,
    "blur": lambda img, lv, rng: img.filter(ImageFilter.GaussianBlur((0.8, 1.6, 2.8, 4.5, 7.0)[lv - 1])),
    "color": _colour,
    "contrast": lambda img, lv, rng: ImageEnhance.Contrast(img).enhance((0.8, 0.6, 0.45, 0.3, 0.18)[lv - 1]),
    "overexposure": lambda img, lv, rng: ImageEnhance.Brightness(img).enhance((1.25, 1.5, 1.8, 2.2, 2.8)[lv - 1]),
    "underexposure": lambda img, lv, rng: ImageEnhance.Brightness(img).enhance((0.8, 0.6, 0.42, 0.28, 0.16)[lv - 1]),
    "spatial": _spatial,
    "quantization": _quantize,
}


def distort(img: Image.Image, distortion: str, level: int, seed: int = 0) -> Image.Image:
    """``img`` with a coarse ``distortion`` at ``level`` 1 (mild) .. 5 (severe); deterministic."""
    if distortion not in DISTORTIONS:
        raise KeyError(f"no synthesiser for {distortion!r}; have {', '.join(DISTORTIONS)}")
    if not 1 <= level <= LEVELS:
        raise ValueError(f"level must be 1..{LEVELS}, got {level}")
    return DISTORTIONS[distortion](img.convert("RGB"), level, np.random.default_rng(seed))


def pseudo_mos(reference: Image.Image, distorted: Image.Image) -> float:
    """100 x SSIM (per RGB channel, averaged) of ``distorted`` against ``reference``."""
    a = np.asarray(reference.convert("RGB"))
    b = np.asarray(distorted.convert("RGB"))
    return 100.0 * float(structural_similarity(a, b, channel_axis=2, data_range=255))


def reference_image(ref: Reference, max_side: int = IMAGE_SIDE) -> Image.Image:
    """A reference as RGB, shrunk so its long side is at most ``max_side`` px."""
    img = Image.fromarray(ref.load()).convert("RGB")
    if max(img.size) > max_side:
        img.thumbnail((max_side, max_side), Image.LANCZOS)
    return img


def _write_reference(args: tuple[int, Path, int]) -> list[dict]:
    index, out, max_side = args  # an index: References hold lambdas, which do not pickle
    ref = REFERENCES[index]
    img = reference_image(ref, max_side)
    rows = []
    jobs = [("pristine", 0)] + [(d, lv) for d in DISTORTIONS for lv in range(1, LEVELS + 1)]
    for name, level in jobs:
        dist = img if name == "pristine" else distort(img, name, level, seed=level)
        rel = f"{ref.name}/{name.replace(' ', '_')}_{level}.png"
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        dist.save(out / rel)
        rows.append({"path": rel, "mos": "", "ssim": f"{pseudo_mos(img, dist):.4f}",  # mos: see level_mos
                     "distortion": "other" if name == "pristine" else name,
                     "scenes": ";".join(ref.scenes), "reference": ref.reference_id, "level": str(level)})
    return rows


def level_mos(rows: list[dict]) -> None:
    """Set each row's ``mos`` to the mean ``ssim`` of its (distortion, level) over all references.

    Per-image SSIM depends on content as much as on the distortion (blur barely changes a smooth
    photograph, noise barely changes gravel), so no model that sees only the distorted image can
    rank images of different references by it. Averaging over the references gives every image
    of one distortion setting the same score, still falling with the level, like a DMOS that
    rates the distortion rather than the content.
    """
    groups: dict[tuple[str, str], list[float]] = {}
    for r in rows:
        groups.setdefault((r["distortion"], r["level"]), []).append(float(r["ssim"]))
    for r in rows:
        r["mos"] = f"{np.mean(groups[r['distortion'], r['level']]):.4f}"


def write_synthetic_dataset(out: Path, references: int | None = None, max_side: int = IMAGE_SIDE,
                            workers: int = 2, progress: bool = True) -> Path:
    """Write the synthetic dataset as PNG files plus ``labels.csv`` in the generic CSV format
    (path, mos, distortion, scenes, reference, level, ssim); returns the CSV's path. ``mos`` is
    :func:`level_mos`; ``ssim`` is each image's own 100 x SSIM against its reference.

    ``references`` limits how many of :data:`REFERENCES` are used (all by default); each gives
    1 + 10 x 5 = 51 images. ``out`` is created, or must be empty or an earlier output of this
    function (:func:`liqe_dist.outputs.claim_dir`).
    """
    import csv
    import multiprocessing as mp

    from tqdm import tqdm

    out = claim_dir(out, "make-synthetic")
    count = min(references, len(REFERENCES)) if references else len(REFERENCES)
    jobs = [(i, out, max_side) for i in range(count)]
    rows: list[dict] = []
    with mp.get_context("spawn").Pool(max(1, min(workers, len(jobs)))) as pool:
        for part in tqdm(pool.imap(_write_reference, jobs), total=len(jobs), unit="reference",
                         desc="synthesising", disable=not progress):
            rows.extend(part)
    level_mos(rows)
    table = out / "labels.csv"
    with open(table, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return table
