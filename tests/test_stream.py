import json
import logging

import pytest
import torch
import webdataset as wds
from torch.utils.data import DataLoader

from shard_fixtures import pack_csv, write_csv_dataset
from liqe_dist.data.crops import CropConfig
from liqe_dist.data.packing import read_manifest
from liqe_dist.data.stream import EvalSamples, TrainBatches, DatasetSpec, collate_eval, iter_shard
from liqe_dist.data.labels import DISTORTIONS, SCENES


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    base = tmp_path_factory.mktemp("stream")
    table = write_csv_dataset(base / "raw", n_refs=10, per_ref=3, size=(232, 224))
    many = pack_csv(table, base / "shards", name="many", shard_max_count=4)   # 8 shards
    one = pack_csv(table, base / "shards", name="one", shard_max_count=1000)  # 1 shard < consumers
    return many, one


def part_keys(shard_dir, split, part):
    code = {"train": "t", "val": "v", "test": "e"}[part]
    keys = []
    for s in read_manifest(shard_dir)["shards"]:
        for raw in iter_shard(shard_dir / s["name"]):
            if json.loads(raw.fields["json"])["splits"][split] == code:
                keys.append(raw.key)
    return sorted(keys)


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("workers", [0, 1, 2])
@pytest.mark.parametrize("which", ["many", "one"])
def test_eval_exactly_once(packed, world, workers, which):
    shard_dir = packed[0] if which == "many" else packed[1]
    crops = CropConfig(eval_crops=2)
    expected = part_keys(shard_dir, 1, "test")
    assert len(expected) >= 3
    seen = []
    for rank in range(world):
        ds = EvalSamples(shard_dir, split=1, part="test", crops=crops, rank=rank, world=world)
        for batch in DataLoader(ds, batch_size=4, num_workers=workers, collate_fn=collate_eval):
            seen.extend(batch["keys"])
            if batch["images"] is not None:
                assert batch["images"].shape[1:] == (2, 3, 224, 224)
    assert sorted(seen) == expected  # every test sample once: none lost, none twice


def test_train_batches_compose_datasets(packed):
    many, one = packed
    ds = TrainBatches([DatasetSpec("d", str(many), 3), DatasetSpec("d", str(one), 2)], split=0, seed=1,
                      crops=CropConfig(train_crops=3), shuffle_buffer=4)
    train_many, train_one = set(part_keys(many, 0, "train")), set(part_keys(one, 0, "train"))
    labels = {}
    for d in (many, one):
        for s in read_manifest(d)["shards"]:
            for raw in iter_shard(d / s["name"]):
                labels[raw.key] = json.loads(raw.fields["json"])
    it = iter(ds)
    seen = []
    for _ in range(12):  # > one epoch of each dataset's 21 training images
        b = next(it)
        assert b["images"].shape == (5, 3, 3, 224, 224)
        assert b["dataset"].tolist() == [0, 0, 0, 1, 1]
        assert set(b["keys"][:3]) <= train_many and set(b["keys"][3:]) <= train_one
        for i, key in enumerate(b["keys"]):
            lab = labels[key]
            assert b["mos"][i].item() == pytest.approx(lab["mos"]) and b["has_mos"][i]
            assert b["distortion"][i].item() == DISTORTIONS.index(lab["distortion"])
            assert [SCENES[j] for j in torch.nonzero(b["scenes"][i]).flatten()] == sorted(
                lab["scenes"], key=SCENES.index)
        seen.extend(b["keys"][:3])
    assert set(seen) == train_many  # the stream went through the whole split (and on)


def test_shard_assignment_changes_with_epoch(packed):
    many, _ = packed
    firsts = set()
    for epoch in range(6):
        ds = TrainBatches([DatasetSpec("d", str(many), 1)], split=0, seed=5, rank=0, world=2, start_epoch=epoch,
                          shuffle_buffer=1, crops=CropConfig(train_crops=1))
        firsts.add(next(iter(ds))["keys"][0].split("_")[1])  # the reference of the first sample
    assert len(firsts) > 1


def test_bad_samples_are_counted_and_skipped(tmp_path, caplog):
    table = write_csv_dataset(tmp_path / "raw", n_refs=3, per_ref=2)
    shard_dir = pack_csv(table, tmp_path / "shards", shard_max_count=100)
    # corrupt one image inside the packed shard (as a damaged copy would be)
    src = shard_dir / "toy-000000.tar"
    samples = [dict(raw.fields, __key__=raw.key) for raw in iter_shard(src)]
    bad = next(s for s in samples if json.loads(s["json"])["splits"][0] == "t")
    bad_key = bad["__key__"]
    [ext] = [k for k in bad if k not in ("json", "__key__")]
    bad[ext] = b"\x89PNG broken"
    with wds.TarWriter(str(src), encoder=False) as w:
        for s in samples:
            w.write(s)
    caplog.set_level(logging.WARNING)
    ds = EvalSamples(shard_dir, split=0, part="train", crops=CropConfig(eval_crops=1))
    batches = list(DataLoader(ds, batch_size=2, collate_fn=collate_eval))
    keys = [k for b in batches for k in b["keys"]]
    assert bad_key not in keys and sum(b["skipped"] for b in batches) == 1
    assert f"skipped sample {bad_key}" in caplog.text
    assert len(keys) == len(part_keys(shard_dir, 0, "train")) - 1
