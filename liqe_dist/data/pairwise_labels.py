"""Pairwise quality labels: "image A looks better than image B with probability p", as people
judged them (the gMAD study's export). The fidelity loss takes exactly such a probability as its
target, so these rows can join training as pairs of corpus images (by key, in the corpus shards).

File: CSV with a header, one row per judged pair:
``key_a, source_a, key_b, source_b, p_a_better, judgments`` and any further columns (kept in
``extra``). ``p_a_better`` in [0, 1]; ``judgments`` >= 1 (how many answers the probability rests on).

Rules:
- Text cells (keys, sources, the extra columns) are written escaped against formula injection
  (:func:`liqe_dist.tables.safe_cell`) and read back with :func:`liqe_dist.tables.read_cell`,
  so a key such as ``=1+1`` or ``-x`` round-trips exactly; the numbers are never escaped
  (``p_a_better`` is written with 6 decimals and is never negative).
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path

from liqe_dist.tables import csv_writer, read_cell

COLUMNS = ("key_a", "source_a", "key_b", "source_b", "p_a_better", "judgments")


@dataclass(frozen=True)
class PairwiseLabel:
    key_a: str
    source_a: str
    key_b: str
    source_b: str
    p_a_better: float
    judgments: int
    extra: dict[str, str] = field(default_factory=dict)


def write_pairwise_labels(path: str | Path, labels: list[PairwiseLabel]) -> None:
    extra = list(dict.fromkeys(k for lab in labels for k in lab.extra))
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv_writer(f)
        w.writerow([*COLUMNS, *extra])
        for lab in labels:
            w.writerow([lab.key_a, lab.source_a, lab.key_b, lab.source_b, f"{lab.p_a_better:.6f}", lab.judgments,
                        *(lab.extra.get(k, "") for k in extra)])


def read_pairwise_labels(path: str | Path) -> list[PairwiseLabel]:
    """Read and check a pairwise label file; errors name the file and line."""
    path = Path(path)
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: not a pairwise label file (columns {missing} missing)")
        labels = []
        for line, row in enumerate(reader, start=2):
            try:
                p, n = float(row["p_a_better"]), int(row["judgments"])
            except (TypeError, ValueError):
                raise ValueError(f"{path}, line {line}: p_a_better must be a number and judgments an integer") from None
            if not (math.isfinite(p) and 0.0 <= p <= 1.0) or n < 1:
                raise ValueError(f"{path}, line {line}: p_a_better must be in [0, 1] and judgments >= 1, got {p}, {n}")
            text = {k: read_cell(v) if isinstance(v, str) else "" for k, v in row.items() if k is not None}
            if not text["key_a"] or not text["key_b"] or text["key_a"] == text["key_b"]:
                raise ValueError(f"{path}, line {line}: key_a and key_b must be two image keys")
            labels.append(PairwiseLabel(text["key_a"], text["source_a"], text["key_b"], text["source_b"], p, n,
                                        {read_cell(k): v for k, v in text.items() if k not in COLUMNS}))
    return labels
