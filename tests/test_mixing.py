"""How well training batches mix references, on a packed KADID-10k-like set: 81 reference
photographs x 25 distortion types x 5 levels (10 125 images), split by reference (57 train).

A uniform shuffle (the reference code's DataLoader(shuffle=True)) puts two versions of the same
photograph in a pair with probability (125 - 1) / (7125 - 1) = 1.74 %. The stream must come
within 1.5x of that; packing in the adapter's order (reference after reference) does not.
"""

from __future__ import annotations

import io
from itertools import combinations

import pytest
from PIL import Image

from liqe_dist.data.packing import PackConfig, pack_records
from liqe_dist.data.records import Record
from liqe_dist.data.stream import TrainBatches, TrainSource

REFS, TYPES, LEVELS, BATCH = 81, 25, 5, 16


def kadid_like_records() -> list[Record]:
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (90, 120, 150)).save(buf, format="PNG")  # content is irrelevant here
    png = buf.getvalue()
    return [Record(key=f"kadid_I{r:02d}_{t:02d}_{lv}", dataset="kadid", mos=float(lv), source=f"dmos.csv:{i}",
                   data=png, ext="png", distortion="blur", reference=f"I{r:02d}")
            for i, (r, t, lv) in enumerate((r, t, lv) for r in range(REFS) for t in range(TYPES)
                                           for lv in range(LEVELS))]


def same_reference_rate(shards, shuffle_buffer: int, world: int = 1, epochs: int = 2) -> float:
    """Fraction of the within-batch pairs (per rank, batches of 16) that share a reference."""
    stream = TrainBatches([TrainSource(str(shards), BATCH)], shuffle_buffer=shuffle_buffer, world=world)
    same = pairs = 0
    for epoch in range(epochs):
        for consumer in range(world):
            refs = [labels["reference"] for _, labels in stream.epoch_order(0, epoch, consumer, world)]
            for start in range(0, len(refs) - BATCH + 1, BATCH):
                for a, b in combinations(refs[start:start + BATCH], 2):
                    same += a == b
                    pairs += 1
    return same / pairs


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    out = tmp_path_factory.mktemp("mixing")
    records = kadid_like_records()
    sets = {}
    for order in ("shuffled", "source"):
        pack_records(records, out / order, "kadid", {}, PackConfig(order=order, workers=2), progress=False)
        sets[order] = out / order
    return sets


UNIFORM = (TYPES * LEVELS - 1) / (57 * TYPES * LEVELS - 1)


@pytest.mark.slow
@pytest.mark.parametrize("world", [1, 2])
def test_batches_mix_references_like_a_uniform_shuffle(packed, world):
    rate = same_reference_rate(packed["shuffled"], shuffle_buffer=256, world=world)
    assert rate <= 1.5 * UNIFORM, f"{rate:.4f} vs uniform {UNIFORM:.4f}"


@pytest.mark.slow
def test_packing_in_source_order_would_not(packed):
    # the failure this guards against: shards of a few references each, mixed by a bounded buffer
    rate = same_reference_rate(packed["source"], shuffle_buffer=256)
    assert rate > 5 * UNIFORM


def test_record_order_is_seeded_and_recorded(tmp_path):
    import json

    records = kadid_like_records()[:300]
    keys = []
    for seed in (0, 0, 1):
        out = tmp_path / f"s{seed}-{len(keys)}"
        pack_records(records, out, "kadid", {}, PackConfig(order_seed=seed, workers=1), progress=False)
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["pack"]["order"] == "shuffled" and manifest["pack"]["order_seed"] == seed
        stream = TrainBatches([TrainSource(str(out), 4)], shuffle_buffer=1)
        keys.append([raw.key for raw, _ in stream.epoch_order(0, 0, 0, 1)])
    assert keys[0] == keys[1] != keys[2]
    assert keys[0] != sorted(keys[0])


def test_stream_warns_about_sets_packed_in_source_order(tmp_path, caplog):
    records = kadid_like_records()[:250]
    pack_records(records, tmp_path / "src", "kadid", {}, PackConfig(order="source", workers=1), progress=False)
    pack_records(records, tmp_path / "mix", "kadid", {}, PackConfig(workers=1), progress=False)
    with caplog.at_level("WARNING"):
        TrainBatches([TrainSource(str(tmp_path / "mix"), 4)])
        assert "source order" not in caplog.text
        TrainBatches([TrainSource(str(tmp_path / "src"), 4)])
        assert "packed in source order" in caplog.text
