"""Shared fixtures: a tiny real open_clip model (random weights) and real image files."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from liqe_dist.models.liqe.model import LIQE, build_clip

torch.set_num_threads(2)

#: How far float32 results of one model on one input may differ between processes that reduce
#: with other thread counts (a 1-CPU Ray worker against this 2-thread process): the summation
#: order changes, so the error is relative to the value (PMT-IQA scores near 7.4 differed by
#: 1.1e-5 on an AVX512_BF16 machine). Within one process results are compared exactly or near it.
ACROSS_THREADS = {"rel": 1e-5, "abs": 1e-6}


@pytest.fixture(scope="session")
def tiny_clip_state() -> dict:
    torch.manual_seed(0)
    clip = build_clip("liqe-tiny")
    # Random init leaves the logit scale at log(1/0.07); use a distinct value so loading is tested.
    with torch.no_grad():
        clip.logit_scale.fill_(4.0)
    return {k: v.clone() for k, v in clip.state_dict().items()}


@pytest.fixture
def tiny_clip(tiny_clip_state):
    clip = build_clip("liqe-tiny")
    clip.load_state_dict(tiny_clip_state)
    return clip


@pytest.fixture
def tiny_liqe(tiny_clip) -> LIQE:
    return LIQE(tiny_clip).eval()


def photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """A smooth random colour image (not constant, so crops differ)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(max(2, height // 32), max(2, width // 32), 3), dtype=np.uint8)
    return Image.fromarray(small).resize((width, height), Image.BILINEAR)


def jpeg_bytes(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


@pytest.fixture
def image_folder(tmp_path):
    """Good images of several sizes plus every kind of broken file."""
    folder = tmp_path / "images"
    folder.mkdir()
    photo(512, 384, 1).save(folder / "a_good.png")
    (folder / "b_good.jpg").write_bytes(jpeg_bytes(photo(640, 480, 2)))
    photo(150, 100, 3).save(folder / "c_small.png")
    (folder / "d_empty.jpg").write_bytes(b"")
    (folder / "e_garbage.png").write_bytes(b"this is not an image at all")
    full = jpeg_bytes(photo(600, 400, 4))
    (folder / "f_truncated.jpg").write_bytes(full[: len(full) // 2])
    return folder
