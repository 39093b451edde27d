"""Helpers shared by the dataset adapters: tables, .mat files, file lookup, errors."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np


class DatasetFormatError(ValueError):
    """A dataset's files are not as expected; the message names the file and the problem."""


@dataclass(frozen=True)
class LeftOut:
    """An entry of a dataset's label file that an adapter leaves out on purpose (e.g. LIVE's
    realigned DMOS marks images without a realigned score as negative): packing writes it to
    ``rejects.tsv`` with its reason, so the count and the cause stay visible."""

    source: str   # label file and index, as a record's ``source``
    path: str     # the image it would have been
    reason: str


class Records(list):
    """An adapter's records (a plain list of :class:`Record`) and the entries it left out
    (``left_out``): a list subclass, so every caller that takes a list keeps working."""

    def __init__(self, records=(), left_out=(), labels: str | None = None):
        super().__init__(records)
        self.left_out: list[LeftOut] = list(left_out)
        self.labels = labels  # the label file read, when a dataset has several (LIVE's two DMOS files)


def require(path: Path, what: str) -> Path:
    if not path.exists():
        raise DatasetFormatError(f"{path}: missing ({what})")
    return path


def read_text(path: Path, encoding: str = "utf-8") -> str:
    """A text file's contents; one that is not valid ``encoding`` is a format error naming it."""
    try:
        return path.read_text(encoding=encoding)
    except UnicodeDecodeError as exc:
        raise DatasetFormatError(f"{path}: not {encoding} text ({exc.reason} at byte {exc.start})") from None


def read_table(path: Path) -> list[dict[str, str]]:
    """Rows of a CSV/TSV (header line) or an .xlsx (first sheet) as dicts of strings,
    with header names lower-cased and stripped."""
    require(path, "label table")
    if path.suffix.lower() in (".xlsx", ".xlsm"):
        import openpyxl

        ws = openpyxl.load_workbook(path, read_only=True, data_only=True).worksheets[0]
        rows = [[("" if v is None else str(v)) for v in row] for row in ws.iter_rows(values_only=True)]
    else:
        lines = read_text(path, "utf-8-sig").splitlines()
        dialect = csv.excel_tab if lines and "\t" in lines[0] else csv.excel
        try:
            rows = list(csv.reader(lines, dialect))
        except csv.Error as exc:  # e.g. a field over the csv module's size limit
            raise DatasetFormatError(f"{path}: not a readable table ({exc})") from None
    rows = [r for r in rows if any(c.strip() for c in r)]
    if not rows:
        raise DatasetFormatError(f"{path}: empty table")
    header = [h.strip().lower() for h in rows[0]]
    return [dict(zip(header, (c.strip() for c in r))) for r in rows[1:]]


def column(row: dict[str, str], path: Path, *names: str, where: str | None = None) -> str:
    """The first of ``names`` present in ``row`` (header names are lower-case); an empty cell
    is named as such (``where``: the row), not as a missing column."""
    for n in names:
        if n in row and row[n] != "":
            return row[n]
    present = [n for n in names if n in row]
    if present:
        raise DatasetFormatError(f"{where or path}: empty {present[0]} cell")
    raise DatasetFormatError(f"{path}: no column {' / '.join(names)} (have {', '.join(row)})")


def to_float(value: str, path: Path, where: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise DatasetFormatError(f"{path}: {where}: {value!r} is not a number") from None


def load_mat(path: Path, *names: str) -> dict[str, np.ndarray]:
    """Variables from a MATLAB .mat file (v5; v7.3 HDF5 files are not supported)."""
    from scipy.io import loadmat

    require(path, "MATLAB file")
    try:
        mat = loadmat(str(path))
    except (ValueError, NotImplementedError, OSError) as exc:
        raise DatasetFormatError(f"{path}: cannot read MATLAB file ({exc})") from None
    missing = [n for n in names if n not in mat]
    if missing:
        raise DatasetFormatError(f"{path}: variable(s) {missing} not found (have {[k for k in mat if not k.startswith('__')]})")
    return {n: mat[n] for n in names}


def mat_strings(arr: np.ndarray) -> list[str]:
    """A MATLAB cell array of strings (any orientation) as a list."""
    out = []
    for item in np.asarray(arr, dtype=object).ravel():
        while isinstance(item, np.ndarray):
            item = item.ravel()[0] if item.size else ""
        out.append(str(item))
    return out


def mat_numbers(arr: np.ndarray) -> list[float]:
    return [float(v) for v in np.asarray(arr, dtype=float).ravel()]


class FileIndex:
    """Case-insensitive lookup of files by name under a folder (datasets mix .BMP and .bmp)."""

    def __init__(self, root: Path):
        self.root = require(root, "image folder")
        self._by_name: dict[str, list[Path]] = {}
        for p in root.rglob("*"):
            if p.is_file():
                self._by_name.setdefault(p.name.lower(), []).append(p)

    def find(self, name: str, where: str) -> Path:
        hits = self._by_name.get(Path(name).name.lower(), [])
        if not hits:
            raise DatasetFormatError(f"{where}: image {name!r} not found under {self.root}")
        if len(hits) > 1:
            exact = [h for h in hits if str(h).lower().endswith(name.lower().replace("\\", "/"))]
            if len(exact) == 1:
                return exact[0]
        return sorted(hits)[0]
