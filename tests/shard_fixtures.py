"""Small real datasets and packed shard sets for the data tests."""

from __future__ import annotations

import csv
from pathlib import Path

from conftest import jpeg_bytes, photo
from liqe_dist.data.adapters import read_dataset
from liqe_dist.data.packing import PackConfig, pack_records

SCENES = ["animal", "human", "plant", "night"]
DISTS = ["blur", "noise", "jpeg compression", "other"]


def write_csv_dataset(root: Path, n_refs: int = 6, per_ref: int = 4, size=(256, 240), extra_rows=()) -> Path:
    """n_refs x per_ref images in mixed formats with full labels, plus ``extra_rows``
    (path, bytes) written as given; returns the labels.csv path."""
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for r in range(n_refs):
        for k in range(per_ref):
            i = r * per_ref + k
            ext = ("png", "jpg", "bmp")[i % 3]
            rel = f"ref{r}/img{k}.{ext}"
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            im = photo(*size, seed=i)
            if ext == "jpg":
                (root / rel).write_bytes(jpeg_bytes(im))
            else:
                im.save(root / rel)
            rows.append([rel, f"{10 + i * 1.5:.2f}", DISTS[k % 4], ";".join(SCENES[: 1 + i % 3]), f"ref{r}"])
    for rel, data in extra_rows:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        if data is not None:
            (root / rel).write_bytes(data)
        rows.append([rel, "1.0", "blur", "animal", "refX"])
    table = root / "labels.csv"
    with open(table, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "mos", "distortion", "scenes", "reference"])
        w.writerows(rows)
    return table


def pack_csv(table: Path, out: Path, name: str = "toy", **cfg) -> Path:
    cfg.setdefault("workers", 1)
    recs = read_dataset("csv", table, name)
    pack_records(recs, out / name, name, {"format": "csv"}, PackConfig(**cfg), progress=False)
    return out / name
