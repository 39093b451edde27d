"""The label sets of the project's shards: LIQE's nine scenes and eleven coarse distortion
classes, and the map from every dataset's own distortion names to those classes.

The order of each list is part of the shard format and of LIQE's models (the reference code's
strings, in its order). Shard manifests and weight files record :data:`VOCABULARY_VERSION`.
"""

from __future__ import annotations

import re

SCENES: tuple[str, ...] = (
    "animal", "cityscape", "human", "indoor", "landscape", "night", "plant", "still_life", "others",
)
DISTORTIONS: tuple[str, ...] = (
    "jpeg2000 compression", "jpeg compression", "noise", "blur", "color", "contrast",
    "overexposure", "underexposure", "spatial", "quantization", "other",
)
#: Version tag written into shard manifests and checkpoints; bump when any list above changes.
VOCABULARY_VERSION = "liqe-ref-1"

# Fine (dataset) distortion name -> coarse class. The first block is the reference code's own
# `dist_map` (33 names, used verbatim in its label lists); the rest are the native names of LIVE,
# CSIQ, TID2013, KADID-10k and the authentic datasets, mapped by the same reasoning.
_REFERENCE_MAP: dict[str, str] = {
    "jpeg2000 compression": "jpeg2000 compression", "jpeg compression": "jpeg compression",
    "white noise": "noise", "gaussian blur": "blur", "fastfading": "jpeg2000 compression",
    "fnoise": "noise", "contrast": "contrast", "lens": "blur", "motion": "blur",
    "diffusion": "color", "shifting": "blur", "color quantization": "quantization",
    "oversaturation": "color", "desaturation": "color", "white with color": "noise",
    "impulse": "noise", "multiplicative": "noise", "white noise with denoise": "noise",
    "brighten": "overexposure", "darken": "underexposure", "shifting the mean": "other",
    "jitter": "spatial", "noneccentricity patch": "spatial", "pixelate": "spatial",
    "quantization": "quantization", "color blocking": "spatial", "sharpness": "contrast",
    "realistic blur": "blur", "realistic noise": "noise", "underexposure": "underexposure",
    "overexposure": "overexposure", "realistic contrast change": "contrast",
    "other realistic": "other",
}
_NATIVE_MAP: dict[str, str] = {
    # LIVE release 2 folder names
    "jp2k": "jpeg2000 compression", "jpeg": "jpeg compression", "wn": "noise",
    "gblur": "blur", "fast fading": "jpeg2000 compression",
    # CSIQ
    "awgn": "noise", "jpeg 2000": "jpeg2000 compression", "jpeg2000": "jpeg2000 compression",
    "pink noise": "noise", "blur": "blur", "noise": "noise",
    # TID2013 (24 types)
    "additive gaussian noise": "noise",
    "additive noise in color components": "noise",
    "spatially correlated noise": "noise", "masked noise": "noise",
    "high frequency noise": "noise", "impulse noise": "noise",
    "quantization noise": "quantization", "image denoising": "noise",
    "jpeg transmission errors": "jpeg compression",
    "jpeg2000 transmission errors": "jpeg2000 compression",
    "non eccentricity pattern noise": "spatial",
    "local block-wise distortions of different intensity": "spatial",
    "mean shift": "other", "contrast change": "contrast",
    "change of color saturation": "color", "multiplicative gaussian noise": "noise",
    "comfort noise": "noise", "lossy compression of noisy images": "noise",
    "image color quantization with dither": "quantization",
    "chromatic aberrations": "color", "sparse sampling and reconstruction": "blur",
    # KADID-10k (25 types)
    "lens blur": "blur", "motion blur": "blur", "color diffusion": "color",
    "color shift": "blur", "color saturation 1": "color", "color saturation 2": "color",
    "white noise in color component": "noise", "multiplicative noise": "noise",
    "denoise": "noise", "non-eccentricity patch": "spatial", "color block": "spatial",
    "high sharpen": "contrast",
    # authentic datasets (BID, LIVE Challenge, KonIQ-10k, SPAQ): one realistic label each
    "authentic": "other", "realistic": "other", "realistic exposure": "other",
    # the synthetic demo set and pristine references
    "pristine": "other", "reference": "other", "color saturation": "color",
    "spatially localized": "spatial", "other": "other",
}
FINE_TO_COARSE: dict[str, str] = {**_NATIVE_MAP, **_REFERENCE_MAP}
_COARSE_NAMES = {name: name for name in DISTORTIONS}


def _normalise_name(name: str) -> str:
    return re.sub(r"[\s_]+", " ", name.strip().lower())


def coarse_distortion(fine: str) -> str:
    """Map a dataset's distortion name (any case, ``_`` or spaces) to one of the 11 classes.

    Raises KeyError listing the known names when ``fine`` is not one of them.
    """
    key = _normalise_name(fine)
    for table in (FINE_TO_COARSE, _COARSE_NAMES):
        if key in table:
            return table[key]
    known = ", ".join(sorted(FINE_TO_COARSE))
    raise KeyError(f"unknown distortion name {fine!r}; known fine names: {known}")
