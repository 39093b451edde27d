"""CSV and TSV tables whose text cells a spreadsheet will not run as formulas (CSV injection).

Every table the project writes from text it did not make itself (file names, keys, sources,
model names, participant ids, reasons) goes through :func:`safe_cell`, here applied to every
cell by :func:`write_csv`, :func:`csv_writer` and :func:`tsv_line`. The rules:

- A text cell (a ``str``) that begins with ``=``, ``+``, ``-``, ``@``, a tab or a carriage
  return gets a leading ``'``, as OWASP advises: a spreadsheet shows it as text.
- A text cell that begins with ``'`` gets one more ``'``, so the escape can be undone exactly:
  :func:`read_cell` strips one leading ``'`` and gives back the text as it was written.
- Numbers (``int``, ``float``, numpy numbers, ``bool``) are never escaped: -0.5 stays a number.
  Only values of type ``str`` are text; a number the caller has already formatted into a string
  is text (pass the number itself instead).
- Header cells are text cells too (a model name may become a column name).
- A reader of a file written here applies :func:`read_cell` to each text cell it uses (never to
  numbers, which were not escaped).
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import IO, Any, Iterable

FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
ESCAPE = "'"


def safe_cell(value: Any) -> Any:
    """``value`` as a CSV cell that no spreadsheet evaluates: text that could start a formula (or
    that starts with ``'``) gets a leading ``'``; anything that is not ``str`` is returned as is."""
    if isinstance(value, str) and value.startswith((*FORMULA_START, ESCAPE)):
        return ESCAPE + value
    return value


def read_cell(text: str) -> str:
    """The text a :func:`safe_cell` cell was made from: one leading ``'`` removed."""
    return text[1:] if text.startswith(ESCAPE) else text


class SafeWriter:
    """``csv.writer`` whose every cell goes through :func:`safe_cell`."""

    def __init__(self, f: IO[str], **options: Any) -> None:
        self._writer = csv.writer(f, **options)

    def writerow(self, row: Iterable[Any]) -> None:
        self._writer.writerow([safe_cell(v) for v in row])

    def writerows(self, rows: Iterable[Iterable[Any]]) -> None:
        for row in rows:
            self.writerow(row)


def csv_writer(f: IO[str], **options: Any) -> SafeWriter:
    """A CSV writer (``csv.writer`` options, e.g. ``delimiter="\\t"``) that escapes text cells."""
    return SafeWriter(f, **options)


def write_csv(path: str | os.PathLike, rows: list[dict], fieldnames: list[str] | None = None) -> None:
    """Write dict ``rows`` as a CSV file with a header (the first row's keys, or ``fieldnames``),
    every text cell escaped. No rows and no ``fieldnames``: an empty file."""
    columns = list(fieldnames if fieldnames is not None else (rows[0] if rows else []))
    with open(Path(path), "w", newline="", encoding="utf-8", errors="surrogateescape") as f:
        if not columns:
            return
        w = csv_writer(f)
        w.writerow(columns)
        w.writerows([row.get(c, "") for c in columns] for row in rows)


_TSV_ESCAPES = {"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"}


def tsv_cell(value: Any) -> str:
    """One TSV cell that cannot split a row and no spreadsheet evaluates: :func:`safe_cell`, then
    backslash, tab, CR and LF written ``\\\\ \\t \\r \\n`` and any other control or
    line-separator character ``\\xNN``/``\\uNNNN`` (file names may hold them all; each escape
    stands for one character, so the name can be told from the row)."""
    out = []
    for c in str(safe_cell(value)):
        if c in _TSV_ESCAPES:
            out.append(_TSV_ESCAPES[c])
        elif c.isprintable() or c == " ":
            out.append(c)
        else:
            out.append(f"\\x{ord(c):02x}" if ord(c) < 256 else f"\\u{ord(c):04x}")
    return "".join(out)


def tsv_line(*cells: Any) -> str:
    """One line of a TSV file of :func:`tsv_cell` s."""
    return "\t".join(tsv_cell(c) for c in cells) + "\n"
