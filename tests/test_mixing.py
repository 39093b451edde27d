"""How well training batches mix references, on a packed KADID-10k-like set: 81 reference
photographs x 25 distortion types x 5 levels (10 125 images), split by reference (57 train).

A uniform shuffle (the reference code's DataLoader(shuffle=True)) puts two versions of the same
photograph in a pair with probability (125 - 1) / (7125 - 1) = 1.74 %. The stream must come
within 1.5x of that; packing in the adapter's order (reference after reference) does not.
"""

from __future__ import annotations

import json

import pytest

from liqe_dist.data.mixing import kadid_like_records, same_reference_rate
from liqe_dist.data.packing import PackConfig, pack_records
from liqe_dist.data.stream import TrainBatches, DatasetSpec


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    out = tmp_path_factory.mktemp("mixing")
    records = kadid_like_records()
    for order in ("shuffled", "source"):
        pack_records(records, out / order, "kadid", {}, PackConfig(order=order, workers=2), progress=False)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("world", [1, 2])
def test_batches_mix_references_like_a_uniform_shuffle(packed, world):
    rate, uniform = same_reference_rate(packed / "shuffled", batch_size=16, shuffle_buffer=256, world=world)
    assert uniform == pytest.approx(124 / 7124)
    assert rate <= 1.5 * uniform, f"{rate:.4f} vs uniform {uniform:.4f}"


@pytest.mark.slow
def test_packing_in_source_order_would_not(packed):
    # the failure this guards against: shards of a few references each, mixed by a bounded buffer
    rate, uniform = same_reference_rate(packed / "source", batch_size=16, shuffle_buffer=256)
    assert rate > 5 * uniform


def test_record_order_is_seeded_and_recorded(tmp_path):
    records = kadid_like_records()[:300]
    keys = []
    for seed in (0, 0, 1):
        out = tmp_path / f"s{seed}-{len(keys)}"
        pack_records(records, out, "kadid", {}, PackConfig(order_seed=seed, workers=1), progress=False)
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["pack"]["order"] == "shuffled" and manifest["pack"]["order_seed"] == seed
        stream = TrainBatches([DatasetSpec("d", str(out), 4)], shuffle_buffer=1)
        keys.append([raw.key for raw, _ in stream.epoch_order(0, 0, 0, 1)])
    assert keys[0] == keys[1] != keys[2]
    assert keys[0] != sorted(keys[0])


def test_stream_warns_about_sets_packed_in_source_order(tmp_path, caplog):
    records = kadid_like_records()[:250]
    pack_records(records, tmp_path / "src", "kadid", {}, PackConfig(order="source", workers=1), progress=False)
    pack_records(records, tmp_path / "mix", "kadid", {}, PackConfig(workers=1), progress=False)
    with caplog.at_level("WARNING"):
        TrainBatches([DatasetSpec("d", str(tmp_path / "mix"), 4)])
        assert "source order" not in caplog.text
        TrainBatches([DatasetSpec("d", str(tmp_path / "src"), 4)])
        assert "packed in source order" in caplog.text
