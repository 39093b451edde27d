"""The PMT-IQA public code's crop pipeline: ``resize_to``, random positions, a flip per crop,
key-seeded evaluation crops, and per-dataset resize and label (:class:`DatasetSpec`)."""

import io
import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import transforms

from conftest import photo
from liqe_dist.config import ConfigError, from_dict
from liqe_dist.data.crops import (CropConfig, ImageShapeError, ImageTooSmallError, eval_crop_sets, eval_crops,
                                  fit_size, random_positions, train_crops)
from liqe_dist.data.packing import MANIFEST, PackConfig, pack_records, read_manifest
from liqe_dist.data.records import Record
from liqe_dist.data.stream import DatasetSpec, EvalSamples, TrainBatches, collate_eval

RANDOM = CropConfig(positions="random", train_crops=4, eval_crops=4)


def coded(width: int, height: int) -> Image.Image:
    """An image whose every pixel says where it is: R = x mod 256, G = y mod 256,
    B = 16 * (x // 256) + y // 256."""
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x % 256, y % 256, 16 * (x // 256) + y // 256], axis=-1).astype(np.uint8)
    return Image.fromarray(rgb)


def where(crop: torch.Tensor, width: int) -> tuple[int, int, bool]:
    """(top, left, flipped) of a ``[3, S, S]`` crop of ``coded(width, ...)``; (top, left) on the
    image the crop was cut from (the flipped one when flipped)."""
    r, g, b = (int(v) for v in crop[:, 0, 0])
    x, y = r + 256 * (b // 16), g + 256 * (b % 16)
    r1, _, b1 = (int(v) for v in crop[:, 0, 1])
    flipped = r1 + 256 * (b1 // 16) < x
    return y, (width - 1 - x if flipped else x), flipped


def check_cut(crop: torch.Tensor, img: Image.Image) -> tuple[int, int, bool]:
    """(top, left, flipped) of ``crop``, after checking it is exactly that cut of ``img``."""
    top, left, flipped = where(crop, img.width)
    source = img.transpose(Image.FLIP_LEFT_RIGHT) if flipped else img
    full = torch.from_numpy(np.array(source)).permute(2, 0, 1)
    size = crop.shape[-1]
    assert torch.equal(crop, full[:, top:top + size, left:left + size])
    return top, left, flipped


# --- resize_to -------------------------------------------------------------------------------

@pytest.mark.parametrize("size,target", [
    ((1024, 768), (384, 512)),  # KonIQ: Resize((512, 384)) is (h, w) -> 384 wide x 512 high
    ((500, 400), (512, 512)),   # BID: Resize((512, 512)); enlarged, aspect not kept
    ((800, 800), (512, 512)),
])
def test_resize_to_gives_exactly_that_size(size, target):
    img, up = fit_size(photo(*size), CropConfig(resize_to=target))
    assert img.size == target and not up
    out = eval_crops(photo(*size), CropConfig(resize_to=target, eval_crops=2))
    assert out.size == target and out.pixels.shape == (2, 3, 224, 224)


def test_resize_to_is_torchvisions_resize_on_pil():
    src = photo(1024, 768, seed=5)
    img, _ = fit_size(src, CropConfig(resize_to=(384, 512)))
    expected = transforms.Resize((512, 384))(src)  # the public code's KonIQ transform
    assert expected.size == (384, 512)
    assert np.array_equal(np.asarray(img), np.asarray(expected))


def test_resize_to_replaces_the_short_side_rule():
    # without resize_to, both sides > 768 -> short side 768; with it, the target wins
    assert fit_size(photo(1200, 900))[0].size == (1024, 768)
    assert fit_size(photo(1200, 900), CropConfig(resize_to=(512, 512)))[0].size == (512, 512)


def test_resize_to_checks_the_aspect_first_and_flags_small_sources():
    with pytest.raises(ImageShapeError, match="max_aspect"):
        fit_size(photo(3400, 200), CropConfig(resize_to=(512, 512)))  # 17:1, though 512x512 would crop
    img, up = fit_size(photo(150, 100), CropConfig(resize_to=(512, 512)))
    assert img.size == (512, 512) and up  # the source had a side under 224
    with pytest.raises(ImageTooSmallError):
        fit_size(photo(150, 100), CropConfig(resize_to=(512, 512), small_images="refuse"))


def test_resize_to_accepts_a_list_and_stays_hashable():
    cfg = CropConfig(resize_to=[384, 512])
    assert cfg.resize_to == (384, 512) and isinstance(cfg.resize_to, tuple)
    assert hash(cfg) == hash(CropConfig(resize_to=(384, 512))) and cfg == CropConfig(resize_to=(384, 512))
    assert from_dict(CropConfig, {"resize_to": [512, 512]}).resize_to == (512, 512)  # as YAML gives it


@pytest.mark.parametrize("value", [[512], [0, 512], [512.0, 512], [True, 512], "512x512", [200, 512]])
def test_resize_to_validation(value):
    with pytest.raises(ValueError, match="crops.resize_to"):
        CropConfig(resize_to=value)


def test_new_fields_validation():
    with pytest.raises(ValueError, match="crops.positions"):
        CropConfig(positions="anywhere")
    with pytest.raises(ConfigError, match="crops.positions"):
        from_dict(CropConfig, {"positions": "anywhere"}, prefix="crops")
    with pytest.raises(ValueError, match="crops.seed"):
        CropConfig(seed=-1)


# --- random positions and flips --------------------------------------------------------------

def test_random_positions_cover_every_pixel_position_within_bounds():
    pos = random_positions(300, 400, 3000, 224, torch.Generator().manual_seed(0))
    tops, lefts = {t for t, _ in pos}, {l for _, l in pos}
    assert tops == set(range(0, 77)) and lefts <= set(range(0, 177))  # top in [0, H - S], left in [0, W - S]
    assert min(lefts) == 0 and max(lefts) == 176 and len(lefts) > 150
    assert random_positions(300, 400, 20, 224, torch.Generator().manual_seed(7)) == \
        random_positions(300, 400, 20, 224, torch.Generator().manual_seed(7))
    assert random_positions(224, 224, 5, 224) == [(0, 0)] * 5  # one position only


def test_random_train_crops_are_seeded_cuts_off_the_grid():
    img = coded(400, 300)
    a = train_crops(img, RANDOM, torch.Generator().manual_seed(3))
    b = train_crops(img, RANDOM, torch.Generator().manual_seed(3))
    assert a.pixels.shape == (4, 3, 224, 224) and torch.equal(a.pixels, b.pixels)
    positions = []
    for seed in range(40):
        for crop in train_crops(img, RANDOM, torch.Generator().manual_seed(seed)).pixels:
            top, left, _ = check_cut(crop, img)
            assert 0 <= top <= 300 - 224 and 0 <= left <= 400 - 224
            positions.append((top, left))
    assert any(t % 32 or l % 32 for t, l in positions)  # not snapped to the 32 px grid
    assert len(set(positions)) > 100


def test_grid_train_crops_stay_on_the_grid():
    img = coded(400, 300)
    for seed in range(20):
        for crop in train_crops(img, CropConfig(train_crops=4), torch.Generator().manual_seed(seed)).pixels:
            top, left, _ = check_cut(crop, img)
            assert top % 32 == 0 and left % 32 == 0


@pytest.mark.parametrize("positions", ["grid", "random"])
def test_flip_per_crop_flips_each_crop_on_its_own(positions):
    img = coded(400, 300)
    per_crop = CropConfig(positions=positions, train_crops=4, flip_per_crop=True)
    per_image = CropConfig(positions=positions, train_crops=4)
    mixed, per_image_sets = 0, set()
    for seed in range(30):
        flips = [check_cut(c, img)[2] for c in train_crops(img, per_crop, torch.Generator().manual_seed(seed)).pixels]
        mixed += len(set(flips)) == 2
        flips = [check_cut(c, img)[2] for c in train_crops(img, per_image, torch.Generator().manual_seed(seed)).pixels]
        assert len(set(flips)) == 1  # one flip of the whole image
        per_image_sets.add(flips[0])
    assert mixed >= 15  # 4 independent fair flips differ with probability 7/8
    assert per_image_sets == {True, False}


def test_no_flip_means_no_flip_per_crop_either():
    img = coded(400, 300)
    cfg = CropConfig(positions="random", train_crops=4, flip=False, flip_per_crop=True)
    for seed in range(20):
        assert not any(check_cut(c, img)[2] for c in train_crops(img, cfg, torch.Generator().manual_seed(seed)).pixels)


# --- evaluation crops seeded by the key ------------------------------------------------------

def test_random_eval_crops_follow_the_key():
    img = coded(400, 300)
    a = eval_crops(img, RANDOM, key="set_ref1_img2")
    assert torch.equal(a.pixels, eval_crops(img, RANDOM, key="set_ref1_img2").pixels)
    assert not torch.equal(a.pixels, eval_crops(img, RANDOM, key="set_ref1_img3").pixels)
    assert not torch.equal(a.pixels, eval_crops(img, replace(RANDOM, seed=1), key="set_ref1_img2").pixels)
    cuts = [check_cut(c, img) for c in a.pixels]
    assert not any(flipped for _, _, flipped in cuts)  # no flip at test time
    [same] = eval_crop_sets(img, [RANDOM], key="set_ref1_img2")
    assert torch.equal(same.pixels, a.pixels)


def test_random_eval_positions_leave_the_grid_over_keys():
    img = coded(400, 300)
    cuts = [check_cut(c, img)[:2] for k in range(30) for c in eval_crops(img, RANDOM, key=f"k{k}").pixels]
    assert any(t % 32 or l % 32 for t, l in cuts) and len(set(cuts)) > 60


# --- shard sets with per-dataset rules -------------------------------------------------------

def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def pack_extra(out, name: str, n: int = 12, size=(300, 260), splits: str = "t", missing: tuple[int, ...] = (),
               write_ranges: bool | None = True, shard_max_count: int = 3):
    """``n`` images whose records carry ``extra={"mos_zscore": z}`` (none for ``missing``), MOS
    10 + i and z = -2 + 0.25 i; ``write_ranges``: set the manifest's ``extra_ranges`` here (None:
    whatever packing wrote, False: remove it)."""
    recs = [Record(key=f"{name}_img{i}", dataset=name, mos=10.0 + i, source=f"test:{i}", data=png(photo(*size, seed=i)),
                   ext="png", splits=splits, extra={} if i in missing else {"mos_zscore": -2.0 + 0.25 * i})
            for i in range(n)]
    pack_records(recs, out / name, name, {"format": "test"}, PackConfig(workers=1, shard_max_count=shard_max_count),
                 progress=False)
    path = out / name / MANIFEST
    manifest = json.loads(path.read_text())
    if write_ranges:
        zs = [r.extra["mos_zscore"] for r in recs if r.extra]
        manifest["extra_ranges"] = {"mos_zscore": [min(zs), max(zs)]}
    elif write_ranges is False:
        manifest.pop("extra_ranges", None)
    path.write_text(json.dumps(manifest))
    return out / name


def eval_pixels(shard_dir, crops: CropConfig, world: int, workers: int = 0) -> dict[str, torch.Tensor]:
    out = {}
    for rank in range(world):
        ds = EvalSamples(shard_dir, split=0, part="test", crops=crops, rank=rank, world=world)
        for batch in DataLoader(ds, batch_size=2, num_workers=workers, collate_fn=collate_eval):
            for key, pixels in zip(batch["keys"], batch["images"]):
                assert key not in out
                out[key] = pixels
    return out


def test_random_eval_crops_do_not_depend_on_ranks_or_workers(tmp_path):
    shards = pack_extra(tmp_path, "toy", n=8, splits="e")
    assert len(read_manifest(shards)["shards"]) == 3
    one = eval_pixels(shards, RANDOM, world=1)
    assert len(one) == 8
    for world, workers in ((2, 0), (3, 0), (2, 1)):
        other = eval_pixels(shards, RANDOM, world, workers)
        assert other.keys() == one.keys() and all(torch.equal(one[k], other[k]) for k in one)
    # and they are the crops eval_crops draws from each key
    img = Image.open(io.BytesIO(png(photo(300, 260, seed=5)))).convert("RGB")
    assert torch.equal(one["toy_img5"], eval_crops(img, RANDOM, key="toy_img5").pixels)


def test_train_batches_train_on_the_label_and_its_range(tmp_path):
    shards = pack_extra(tmp_path, "kq", n=12, missing=(3,))
    z = {f"kq_img{i}": -2.0 + 0.25 * i for i in range(12) if i != 3}
    lo, hi = -2.0, -2.0 + 0.25 * 11
    ds = TrainBatches([DatasetSpec("kq", str(shards), 4, label="mos_zscore")], crops=CropConfig(train_crops=1),
                      shuffle_buffer=1)
    seen = set()
    for batch, _ in zip(ds, range(6)):
        for i, key in enumerate(batch["keys"]):
            seen.add(key)
            if key == "kq_img3":  # no mos_zscore: like a sample without MOS
                assert not batch["has_mos"][i] and batch["mos_unit"][i].isnan()
                continue
            assert batch["has_mos"][i] and batch["mos"][i].item() == pytest.approx(z[key])
            assert batch["mos_unit"][i].item() == pytest.approx((z[key] - lo) / (hi - lo))
    assert "kq_img3" in seen and len(seen) == 12
    # the same set on its MOS: mos_range, not extra_ranges
    batch = next(iter(TrainBatches([DatasetSpec("kq", str(shards), 4)], crops=CropConfig(train_crops=1))))
    for i, key in enumerate(batch["keys"]):
        m = 10.0 + int(key.removeprefix("kq_img"))
        assert batch["mos"][i].item() == m and batch["mos_unit"][i].item() == pytest.approx((m - 10) / 11)


def test_a_label_without_a_range_is_a_clear_error(tmp_path):
    shards = pack_extra(tmp_path, "kq", n=6, write_ranges=False)
    with pytest.raises(ValueError, match=r"kq: label 'mos_zscore' has no range.*extra_ranges"):
        TrainBatches([DatasetSpec("kq", str(shards), 2, label="mos_zscore")])
    with pytest.raises(ValueError, match="extra_ranges"):
        TrainBatches([DatasetSpec("kq", str(shards), 2, label="mos_std")])


def test_train_batches_use_each_datasets_resize(tmp_path):
    a = pack_extra(tmp_path, "a", n=4, size=(300, 260))
    b = pack_extra(tmp_path, "b", n=4, size=(300, 260))
    crops = CropConfig(train_crops=1, positions="random", flip=False)
    ds = TrainBatches([DatasetSpec("a", str(a), 1, resize=[224, 224]), DatasetSpec("b", str(b), 1)], crops=crops)
    assert ds.dataset_crops[0].resize_to == (224, 224) and ds.dataset_crops[1].resize_to is None
    batch = next(iter(ds))
    key_a = batch["keys"][0]
    src = photo(300, 260, seed=int(key_a.removeprefix("a_img")))
    # a 224 x 224 resize leaves one position: the crop is the whole resized image
    resized = torch.from_numpy(np.array(fit_size(src, ds.dataset_crops[0])[0])).permute(2, 0, 1)
    decoded = Image.open(io.BytesIO(png(src))).convert("RGB")
    assert torch.equal(batch["images"][0, 0], torch.from_numpy(
        np.array(decoded.resize((224, 224), Image.BILINEAR))).permute(2, 0, 1))
    assert torch.equal(batch["images"][0, 0], resized)
    with pytest.raises(ValueError, match=r"datasets\.a\.resize.*under the crop size"):
        TrainBatches([DatasetSpec("a", str(a), 1, resize=(200, 512))], crops=crops)


def test_dataset_spec_fields():
    spec = from_dict(DatasetSpec, {"name": "koniq", "shards": "s", "resize": [384, 512], "label": "mos_zscore"})
    assert spec.resize == (384, 512) and spec.label == "mos_zscore" and hash(spec)
    assert DatasetSpec("d", "s").resize is None and DatasetSpec("d", "s").label == "mos"
    assert spec.crop_rules(CropConfig()).resize_to == (384, 512)
    with pytest.raises(ValueError, match=r"datasets\.koniq\.label"):
        DatasetSpec("koniq", "s", label="extra.mos_zscore")
    with pytest.raises(ValueError, match=r"datasets\.koniq\.resize"):
        DatasetSpec("koniq", "s", resize=(384,))


def test_evaluate_shards_takes_dataset_specs(tmp_path, tiny_liqe):
    from liqe_dist.eval.shard_eval import evaluate_shards

    shards = pack_extra(tmp_path, "kq", n=6, splits="e", missing=(2,))
    crops = CropConfig(eval_crops=2)
    by_path = evaluate_shards(tiny_liqe, [shards], 0, "test", crops, progress=False)["kq"]
    spec = DatasetSpec("kq", str(shards), resize=(224, 224), label="mos_zscore")
    by_spec = evaluate_shards(tiny_liqe, [spec], 0, "test", crops, progress=False)["kq"]
    assert by_path.keys == by_spec.keys
    z = {f"kq_img{i}": -2.0 + 0.25 * i for i in range(6)}
    assert by_path.mos == [10.0 + int(k.removeprefix("kq_img")) for k in by_path.keys]
    for key, m in zip(by_spec.keys, by_spec.mos):  # the label, NaN (no MOS) where a record lacks it
        assert np.isnan(m) if key == "kq_img2" else m == pytest.approx(z[key])
    assert by_path.quality.n == 6 and by_spec.quality.n == 5
    # the spec's resize reaches the model: the scores change
    assert by_path.score != by_spec.score
