"""How well training batches mix references: the fraction of within-batch pairs that are two
versions of the same reference photograph, against what a uniform shuffle gives.

Used by ``tests/test_mixing.py`` and ``launch/bench_mixing.py`` on a KADID-10k-like set
(:func:`kadid_like_records`: 81 references x 25 distortion types x 5 levels).
"""

from __future__ import annotations

import io
from collections import Counter
from itertools import combinations
from pathlib import Path

from PIL import Image

from liqe_dist.data.records import Record
from liqe_dist.data.stream import TrainBatches, DatasetSpec


def kadid_like_records(refs: int = 81, types: int = 25, levels: int = 5) -> list[Record]:
    """``refs x types x levels`` records with reference ids, listed reference by reference as
    the adapters list them; every image is the same tiny PNG (content is irrelevant here)."""
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (90, 120, 150)).save(buf, format="PNG")
    png = buf.getvalue()
    combos = ((r, t, lv) for r in range(refs) for t in range(types) for lv in range(levels))
    return [Record(key=f"kadid_I{r:02d}_{t:02d}_{lv}", dataset="kadid", mos=float(lv), source=f"dmos.csv:{i}",
                   data=png, ext="png", distortion="blur", reference=f"I{r:02d}")
            for i, (r, t, lv) in enumerate(combos)]


def same_reference_rate(shard_dir: str | Path, batch_size: int, shuffle_buffer: int, world: int = 1,
                        epochs: int = 2, split: int = 0) -> tuple[float, float]:
    """(rate in the training stream's batches of ``batch_size`` per rank, rate of a uniform
    shuffle of the same training part), over ``epochs`` epochs of every rank."""
    stream = TrainBatches([DatasetSpec("d", str(shard_dir), batch_size)], split=split, shuffle_buffer=shuffle_buffer,
                          world=world)
    same = pairs = 0
    per_ref: Counter = Counter()
    for epoch in range(epochs):
        for consumer in range(world):
            refs = [labels["reference"] for _, labels in stream.epoch_order(0, epoch, consumer, world)]
            if epoch == 0:
                per_ref.update(refs)
            for start in range(0, len(refs) - batch_size + 1, batch_size):
                for a, b in combinations(refs[start:start + batch_size], 2):
                    same += a == b
                    pairs += 1
    n = sum(per_ref.values())
    uniform = sum(k * (k - 1) for k in per_ref.values()) / (n * (n - 1))
    return same / pairs, uniform
