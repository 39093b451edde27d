"""Images of every type become the right 8-bit RGB, in decoding, scoring and the stream alike;
degenerate inputs are refused with a message, never clipped, blocked on or read without bound."""

from __future__ import annotations

import io
import os
import time

import numpy as np
import pytest
import torch
from PIL import Image

from liqe_dist.data.crops import CropConfig, ImageShapeError, eval_crops
from liqe_dist.data.images import ImageDecodeError, decode_image, to_rgb


def saved(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def gradient16(w: int = 256, h: int = 240) -> np.ndarray:
    """16-bit values whose 8-bit equivalent (v / 257) is known exactly: 257 * (x mod 256)."""
    return (257 * (np.arange(w, dtype=np.uint32)[None, :].repeat(h, 0) % 256)).astype(np.uint16)


def test_16_bit_images_scale_by_their_range():
    a16 = gradient16()
    expected = (a16 // 257).astype(np.uint8)
    for fmt in ("PNG", "TIFF", "PPM"):  # Pillow opens these as I;16, I;16 and I (int32)
        img = decode_image(saved(Image.fromarray(a16), fmt), source=fmt)
        assert img.mode == "RGB"
        assert np.array_equal(np.asarray(img)[..., 0], expected), fmt
    # what convert("RGB") does instead: nearly everything white
    assert np.asarray(Image.fromarray(a16).convert("RGB")).mean() > 250


def test_float_images_are_read_as_0_to_1_and_alpha_composites_on_white():
    f = np.array([[0.0, 0.25, 1.0, 1.5]], dtype=np.float32).repeat(4, 0)
    assert np.asarray(decode_image(saved(Image.fromarray(f, "F"), "TIFF")))[0, :, 0].tolist() == [0, 64, 255, 255]
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., 0], rgba[..., 3] = 255, 128          # half-transparent red
    rgba[0, 0] = (0, 0, 255, 0)                     # a fully transparent pixel: background only
    out = np.asarray(decode_image(saved(Image.fromarray(rgba, "RGBA"), "PNG"))).astype(int)
    assert out[0, 0].tolist() == [255, 255, 255]
    assert out[1, 1, 0] == 255 and abs(out[1, 1, 1] - 127) <= 1 and abs(out[1, 1, 2] - 127) <= 1


def test_scoring_and_stream_see_the_same_pixels_as_the_8_bit_image(tmp_path, tiny_liqe):
    from liqe_dist.eval.scoring import Scorer
    from shard_fixtures import pack_csv

    a16 = gradient16()
    eight = Image.fromarray((a16 // 257).astype(np.uint8)).convert("RGB")
    Image.fromarray(a16).save(tmp_path / "deep.png")
    eight.save(tmp_path / "eight.png")
    scorer = Scorer(tiny_liqe)
    deep, ref = scorer.score([str(tmp_path / "deep.png"), str(tmp_path / "eight.png")])
    assert deep.quality == pytest.approx(ref.quality, abs=1e-6)
    [api] = scorer.score(Image.fromarray(a16))  # a PIL image handed to the Python API
    assert api.quality == pytest.approx(ref.quality, abs=1e-6)
    # packed and streamed: the stream's crops are the 8-bit image's crops
    (tmp_path / "ds").mkdir()
    for i in range(10):
        Image.fromarray(a16).save(tmp_path / "ds" / f"{i}.png")
    (tmp_path / "ds" / "labels.csv").write_text("path,mos\n" + "".join(f"{i}.png,{i}\n" for i in range(10)))
    shards = pack_csv(tmp_path / "ds" / "labels.csv", tmp_path / "shards", "deep")
    from liqe_dist.data.stream import EvalSamples

    samples = [s for s, _, _ in EvalSamples(shards, 0, "test", CropConfig(eval_crops=2)) if s is not None]
    assert samples and torch.equal(samples[0].pixels, eval_crops(eight, CropConfig(eval_crops=2)).pixels)


def test_thin_images_are_refused_before_any_resize():
    for size in ((1, 600), (10_000, 1), (300, 5000)):
        with pytest.raises(ImageShapeError, match="thinner than 1:16"):
            eval_crops(Image.new("RGB", size), CropConfig(), source="thin.png")
    assert eval_crops(Image.new("RGB", (224, 224 * 16)), CropConfig(eval_crops=1)).pixels.shape[0] == 1


def test_the_pixel_limit_is_ours_not_pillows(monkeypatch):
    data = saved(Image.new("RGB", (200, 100)), "PNG")  # 20 000 pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 5_000)  # stands for Pillow's 89.5 MP default
    assert decode_image(data, max_pixels=30_000).size == (200, 100)  # allowed by our limit
    with pytest.raises(ImageDecodeError, match=r"image too large \(200x100 = 20000 pixels > limit 10000\)"):
        decode_image(data, max_pixels=10_000)
    assert Image.MAX_IMAGE_PIXELS == 5_000  # restored


def test_non_regular_files_are_refused_without_blocking(tmp_path):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    start = time.monotonic()
    with pytest.raises(ImageDecodeError, match="not a regular file"):
        decode_image(fifo)
    with pytest.raises(ImageDecodeError, match="not a regular file"):
        decode_image("/dev/zero")
    assert time.monotonic() - start < 5
    with pytest.raises(ImageDecodeError, match="is a directory"):
        decode_image(tmp_path)


def test_to_rgb_keeps_plain_images():
    img = Image.new("RGB", (3, 3), (1, 2, 3))
    assert to_rgb(img) is img
    assert to_rgb(Image.new("L", (3, 3), 7)).getpixel((0, 0)) == (7, 7, 7)
