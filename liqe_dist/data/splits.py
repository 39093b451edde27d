"""Train/val/test splits: ten seeded 70/10/20 splits per dataset, as the LIQE protocol.

Datasets with reference images (synthetic distortions) are split by reference, so no content
appears in two parts; others by image. Each record carries one letter per split (``t``, ``v``,
``e``, or ``-`` when a given split list leaves it out), so one packed copy serves all ten.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from liqe_dist.data.records import PART_CODES, Record, split_code


def _sizes(n: int, fractions: tuple[float, float, float]) -> tuple[int, int]:
    n_val = int(round(n * fractions[1]))
    n_test = int(round(n * fractions[2]))
    if n >= 3:  # every part gets something when there is enough to go round
        n_val, n_test = max(n_val, 1), max(n_test, 1)
    return n - n_val - n_test, n_val


def assign_splits(records: list[Record], count: int = 10, seed: int = 0,
                  fractions: tuple[float, float, float] = (0.7, 0.1, 0.2)) -> dict:
    """Fill ``record.splits`` for ``count`` seeded splits; returns the manifest's split entry.

    Records that already carry splits (from the reference label lists) are kept as given.
    """
    if not records:
        raise ValueError("no records to split")
    if any(r.splits for r in records):
        if not all(r.splits for r in records) or len({len(r.splits) for r in records}) != 1:
            raise ValueError("some records carry given splits and others do not (or lengths differ)")
        return split_summary(records, by="given", seed=None)
    if abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"split fractions must sum to 1, got {fractions}")
    with_ref = [r.reference is not None for r in records]
    if any(with_ref) and not all(with_ref):
        missing = next(r.source for r in records if r.reference is None)
        raise ValueError(f"{missing}: no reference id while other records of the dataset have one")
    by = "reference" if all(with_ref) else "image"
    groups = sorted({r.reference if by == "reference" else r.key for r in records})
    letters = {g: [] for g in groups}
    n_train, n_val = _sizes(len(groups), fractions)
    for i in range(count):
        order = np.random.default_rng([seed, i]).permutation(len(groups))
        for rank, g in enumerate(order):
            part = "train" if rank < n_train else "val" if rank < n_train + n_val else "test"
            letters[groups[g]].append(PART_CODES[part])
    for r in records:
        r.splits = "".join(letters[r.reference if by == "reference" else r.key])
    return split_summary(records, by=by, seed=seed, fractions=fractions)


def split_summary(records: list[Record], by: str, seed: int | None,
                  fractions: tuple[float, float, float] | None = None) -> dict:
    """Counts of images per part for each split, for the manifest."""
    count = len(records[0].splits)
    counts = []
    for i in range(count):
        c = Counter(r.splits[i] for r in records)
        counts.append({name: c.get(code, 0) for name, code in PART_CODES.items()})
    return {"count": count, "by": by, "seed": seed, "fractions": list(fractions) if fractions else None,
            "counts": counts}


def in_part(splits: str, split: int, part: str) -> bool:
    """Whether a record with split letters ``splits`` is in ``part`` of split ``split`` (0-based);
    part ``all``: every record (a whole dataset, for cross-dataset evaluation)."""
    if part == "all":
        return True
    code = split_code(part)
    if not 0 <= split < len(splits):
        raise IndexError(f"split {split} out of range: the dataset has {len(splits)} splits")
    return splits[split] == code
