"""Datasets with authentic (camera) distortions: BID, LIVE Challenge, KonIQ-10k, SPAQ.

Their native files carry MOS (and some a std) but no per-image distortion or scene labels;
those stay missing (bring them with the reference label lists). MOS keeps each dataset's scale.
"""

from __future__ import annotations

import math
from pathlib import Path

from liqe_dist.data.records import Record, make_key
from liqe_dist.data.adapters._common import (DatasetFormatError, FileIndex, column, load_mat, mat_numbers, mat_strings,
                      read_table, to_float)


def read_koniq(root: Path, dataset: str = "koniq10k") -> list[Record]:
    """KonIQ-10k: koniq10k_scores_and_distributions.csv (image_name, MOS 1..5, SD, and in the
    released file MOS_zscore 0..100) and the images in 1024x768/ (or 512x384/). MOS is the 1..5
    column; MOS_zscore, when there, goes to ``extra["mos_zscore"]`` (what the public PMT-IQA
    code regresses)."""
    table = root / "koniq10k_scores_and_distributions.csv"
    folder = next((root / d for d in ("1024x768", "512x384") if (root / d).is_dir()), root / "1024x768")
    files = FileIndex(folder)
    out = []
    for i, row in enumerate(read_table(table), 2):
        where = f"{table}:{i}"
        name = column(row, table, "image_name")
        sd = row.get("sd")
        out.append(Record(key=make_key(dataset, name), dataset=dataset, mos=to_float(column(row, table, "mos"), table, where),
                          source=where, path=str(files.find(name, where)),
                          mos_std=to_float(sd, table, where) if sd else None, extra=_koniq_extra(row, table, where)))
    return out


def _koniq_extra(row: dict[str, str], table: Path, where: str) -> dict[str, float]:
    """``{"mos_zscore": value}`` when the table has a MOS_zscore column (header names are
    lower-case here), else nothing; an empty or non-numeric cell is an error naming the line."""
    if "mos_zscore" not in row:
        return {}
    text = column(row, table, "mos_zscore", where=where)
    value = to_float(text, table, where)
    if not math.isfinite(value):  # a NaN label would poison a training stream's scaling
        raise DatasetFormatError(f"{where}: MOS_zscore {text!r} is not a finite number")
    return {"mos_zscore": value}


def read_clive(root: Path, dataset: str = "clive", include_training_images: bool = False) -> list[Record]:
    """LIVE Challenge: Data/AllImages_release.mat, Data/AllMOS_release.mat (0..100),
    Data/AllStdDev_release.mat (optional), Images/. The first 7 entries are the database's
    training images (Images/trainingImages/), left out unless ``include_training_images``."""
    data = root / "Data"
    names = mat_strings(load_mat(data / "AllImages_release.mat", "AllImages_release")["AllImages_release"])
    mos = mat_numbers(load_mat(data / "AllMOS_release.mat", "AllMOS_release")["AllMOS_release"])
    std_path = data / "AllStdDev_release.mat"
    std = mat_numbers(load_mat(std_path, "AllStdDev_release")["AllStdDev_release"]) if std_path.exists() else None
    if len(names) != len(mos) or (std is not None and len(std) != len(mos)):
        raise DatasetFormatError(f"{data}: {len(names)} image names but {len(mos)} MOS values"
                                 + (f" and {len(std)} std values" if std else ""))
    files = FileIndex(root / "Images")
    start = 0 if include_training_images else 7
    return [Record(key=make_key(dataset, names[i]), dataset=dataset, mos=mos[i],
                   source=f"{data / 'AllMOS_release.mat'}[{i}]", path=str(files.find(names[i], f"{data}[{i}]")),
                   mos_std=std[i] if std else None)
            for i in range(start, len(names))]


def read_bid(root: Path, dataset: str = "bid", table: Path | None = None) -> list[Record]:
    """BID: the grades table (DatabaseGrades.xlsx/.csv: image number and average subjective
    grade 0..5) and the images DatabaseImage<NNNN>.JPG."""
    table = table or next((p for p in (root / "DatabaseGrades.xlsx", root / "DatabaseGrades.csv") if p.exists()),
                          root / "DatabaseGrades.xlsx")
    files = FileIndex(root)
    out = []
    for i, row in enumerate(read_table(table), 2):
        where = f"{table}:{i}"
        ident = column(row, table, "image number", "image", "image name")
        name = f"DatabaseImage{int(float(ident)):04d}.JPG" if ident.replace(".", "").isdigit() else ident
        grade = column(row, table, "average subjective grade", "mos", "grade")
        out.append(Record(key=make_key(dataset, name), dataset=dataset, mos=to_float(grade, table, where),
                          source=where, path=str(files.find(name, where))))
    return out


def read_spaq(root: Path, dataset: str = "spaq", table: Path | None = None) -> list[Record]:
    """SPAQ: "MOS and Image attribute scores.xlsx" (Image name, MOS 0..100, and five attribute
    scores, kept in ``extra``) and TestImage/."""
    candidates = [root / "Annotations" / "MOS and Image attribute scores.xlsx",
                  root / "MOS and Image attribute scores.xlsx", root / "mos.csv"]
    table = table or next((p for p in candidates if p.exists()), candidates[0])
    files = FileIndex(root / "TestImage") if (root / "TestImage").is_dir() else FileIndex(root)
    out = []
    for i, row in enumerate(read_table(table), 2):
        where = f"{table}:{i}"
        name = column(row, table, "image name", "image")
        attrs = {k: float(v) for k, v in row.items()
                 if k in ("brightness", "colorfulness", "contrast", "noisiness", "sharpness") and v}
        out.append(Record(key=make_key(dataset, name), dataset=dataset, mos=to_float(column(row, table, "mos"), table, where),
                          source=where, path=str(files.find(name, where)), extra=attrs))
    return out
