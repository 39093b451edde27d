import pytest
import torch
from PIL import Image

from conftest import photo
from torchvision import transforms

from liqe_dist.data.crops import (CLIP_MEAN, CLIP_STD, CropConfig, ImageTooSmallError, eval_crops,
                             eval_indices, fit_size, grid_positions, normalise, train_crops)


def reference_patches(img: Image.Image) -> torch.Tensor:
    """The reference code's crop grid: ToTensor + Normalize on the whole image, then unfold with
    stride 32 (48 if a side >= 1024)."""
    t = transforms.Compose([transforms.ToTensor(), transforms.Normalize(CLIP_MEAN, CLIP_STD)])(img)[None]
    step = 48 if (t.size(2) >= 1024) | (t.size(3) >= 1024) else 32
    return t.unfold(2, 224, step).unfold(3, 224, step).permute(2, 3, 0, 1, 4, 5).reshape(-1, 3, 224, 224)


@pytest.mark.parametrize("size,expected", [
    ((1024, 800), (983, 768)),   # both sides > 768: short side to 768
    ((800, 1000), (768, 960)),
    ((800, 700), (800, 700)),    # one side <= 768: untouched
    ((2000, 500), (2000, 500)),
    ((768, 900), (768, 900)),
])
def test_adaptive_resize(size, expected):
    img, up = fit_size(photo(*size))
    assert img.size == expected and not up


def test_eval_crops_are_the_reference_selection():
    img = photo(512, 384)
    patches = reference_patches(img)
    assert patches.shape[0] == 6 * 10 == len(grid_positions(384, 512))
    sel = [i * (60 // 15) for i in range(15)]
    out = eval_crops(img)
    assert out.pixels.shape == (15, 3, 224, 224) and out.pixels.dtype == torch.uint8
    assert torch.equal(normalise(out.pixels), patches[sel])  # bit for bit


def test_stride_48_for_large_sides():
    img = photo(1100, 700)  # 700 <= 768 so no resize; a side >= 1024 -> stride 48
    patches = reference_patches(img)
    assert len(grid_positions(700, 1100)) == patches.shape[0] == 10 * 19
    out = eval_crops(img)
    assert torch.equal(normalise(out.pixels), patches[[i * (190 // 15) for i in range(15)]])


def test_train_crops_come_from_the_grid_and_are_seeded():
    img = photo(448, 320)
    patches = reference_patches(img)
    flipped = reference_patches(img.transpose(Image.FLIP_LEFT_RIGHT))
    cfg = CropConfig()
    a = train_crops(img, cfg, torch.Generator().manual_seed(3))
    b = train_crops(img, cfg, torch.Generator().manual_seed(3))
    assert a.pixels.shape == (3, 3, 224, 224)
    assert torch.equal(a.pixels, b.pixels)
    for crop in normalise(a.pixels):
        assert any(torch.equal(crop, p) for p in patches) or any(torch.equal(crop, p) for p in flipped)
    flips = set()
    for seed in range(20):
        c = normalise(train_crops(img, cfg, torch.Generator().manual_seed(seed)).pixels[0])
        flips.add(any(torch.equal(c, p) for p in flipped) and not any(torch.equal(c, p) for p in patches))
    assert flips == {True, False}  # both orientations occur


def test_normalisation_is_clip():
    img = Image.new("RGB", (224, 224), (255, 0, 128))
    t = normalise(eval_crops(img, CropConfig(eval_crops=1)).pixels)[0]
    for ch, v in enumerate((1.0, 0.0, 128 / 255)):
        assert t[ch, 0, 0].item() == pytest.approx((v - CLIP_MEAN[ch]) / CLIP_STD[ch], abs=1e-6)


def test_normalisation_runs_in_float32_and_casts():
    pixels = torch.randint(0, 256, (2, 3, 3, 8, 8), dtype=torch.uint8)
    assert torch.equal(normalise(pixels, torch.bfloat16), normalise(pixels).to(torch.bfloat16))
    with pytest.raises(TypeError, match="uint8"):
        normalise(pixels.float())


def test_small_images_upsampled_and_flagged():
    out = eval_crops(photo(150, 100))
    assert out.upsampled and min(out.size) == 224
    assert out.pixels.shape == (15, 3, 224, 224)


def test_small_images_refused_with_the_source_named():
    with pytest.raises(ImageTooSmallError, match="tiny.png: 150x100"):
        eval_crops(photo(150, 100), CropConfig(small_images="refuse"), source="tiny.png")


def test_fewer_positions_than_crops_spreads_over_all():
    assert eval_indices(4, 15) == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3]
    assert eval_indices(60, 15) == list(range(0, 60, 4))
    out = eval_crops(photo(224, 256))  # two grid positions
    assert out.pixels.shape[0] == 15 and not out.upsampled


def test_crop_config_validation():
    with pytest.raises(ValueError, match="small_images"):
        CropConfig(small_images="pad")
    with pytest.raises(ValueError, match="eval_crops"):
        CropConfig(eval_crops=0)
