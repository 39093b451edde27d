"""A generic CSV for users' own data (and the synthetic demo set).

Columns (header required): ``path`` (relative to the CSV's folder unless absolute), ``mos``
(higher is better); optional ``std``, ``distortion`` (a fine or coarse name), ``scenes``
(up to 3, separated by ``;``), ``reference`` (reference-image id: enables reference-wise splits).
"""

from __future__ import annotations

from pathlib import Path

from liqe_dist.data.records import Record, make_key
from liqe_dist.data.adapters._common import DatasetFormatError, column, read_table, to_float


def read_generic_csv(table: Path, dataset: str, image_root: Path | None = None) -> list[Record]:
    rows = read_table(table)
    root = image_root or table.parent
    out: list[Record] = []
    seen: dict[str, str] = {}
    for i, row in enumerate(rows, 2):
        where = f"{table}:{i}"
        rel = column(row, table, "path", "image", "file", where=where)
        key = make_key(dataset, rel)
        if rel in seen:
            raise DatasetFormatError(f"duplicate entry {rel!r}: {seen[rel]} and {where}")
        seen[rel] = where
        std = row.get("std") or row.get("mos_std")
        scenes = tuple(s.strip() for s in (row.get("scenes") or "").split(";") if s.strip())
        try:
            out.append(Record(
                key=key, dataset=dataset, mos=to_float(column(row, table, "mos", where=where), table, f"line {i}"),
                source=where, path=str(Path(rel) if Path(rel).is_absolute() else root / rel),
                mos_std=to_float(std, table, f"line {i}") if std else None,
                distortion_fine=row.get("distortion") or None, scenes=scenes,
                reference=row.get("reference") or None))
        except (KeyError, ValueError) as exc:
            if isinstance(exc, DatasetFormatError):
                raise
            raise DatasetFormatError(f"{where}: {exc}") from None
    return out
