"""Reading a gMAD ``pairs.csv`` (what ``liqe-dist gmad search`` writes) for the study and its
analysis: each pair's roles, level, both images' keys and sources, and the image files beside it.

The image of a pair is found by its pair number alone: ``images/NNNNN_best.EXT`` and
``images/NNNNN_worst.EXT`` with EXT from a fixed list. No text of the CSV becomes a path, so a
hand-edited or hostile pairs file cannot point the study server at another file.

The whole text is parsed by the csv module (a UTF-8 BOM dropped), never split into lines first:
any field, newlines and Unicode line separators included, reads back as written.
"""

from __future__ import annotations

import csv
import hashlib
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from liqe_dist.gmad.scores import BROWSER_FORMATS
from liqe_dist.gmad.search import GMADError
from liqe_dist.tables import read_cell

SIDES = ("best", "worst")
REQUIRED = ("pair", "defender", "attacker", "level", "best_key", "worst_key", "best_source", "worst_source")
TEXT_COLUMNS = ("defender", "attacker", "best_key", "worst_key", "best_source", "worst_source")
MEDIA_TYPES = {"jpg": "image/jpeg", "png": "image/png", "bmp": "image/bmp", "gif": "image/gif", "webp": "image/webp"}
MAX_PAIR = 99_999  # pair numbers name the image files with 5 digits; people judge far fewer pairs


@dataclass(frozen=True)
class GmadPair:
    """One row of pairs.csv. ``best``/``worst``: the attacker's highest- and lowest-scored image of
    the defender's level; ``keys``/``sources``/``images`` map each of them to its key, its path in
    the corpus as packed, and the image file to show."""

    pair: int
    defender: str
    attacker: str
    level: int
    keys: dict[str, str]
    sources: dict[str, str]
    images: dict[str, Path]
    level_images: int | None = None  # N_jk: the defender's images in the level's window (None: not recorded)


@dataclass(frozen=True)
class PairsFile:
    path: Path
    sha256: str
    pairs: list[GmadPair]
    models: list[str]           # defenders and attackers in order of first appearance

    def by_id(self) -> dict[int, GmadPair]:
        return {p.pair: p for p in self.pairs}


def read_pairs(path: str | Path, need_images: bool = True) -> PairsFile:
    """Read and check a pairs file; with ``need_images`` every pair's two image files must exist."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise GMADError(f"{path}: cannot read the pairs file ({exc.strerror or exc})") from None
    try:
        text = raw.decode("utf-8-sig")  # spreadsheet programs save a BOM
    except UnicodeDecodeError:
        raise GMADError(f"{path}: not a UTF-8 CSV file") from None
    rows = _csv_rows(path, text)
    fields = next(rows, (0, []))[1]
    missing = [c for c in REQUIRED if c not in fields]
    if missing:
        raise GMADError(f"{path}: not a gMAD pairs file (columns {missing} missing; "
                        f"make one with `liqe-dist gmad search`)")
    pairs: list[GmadPair] = []
    seen: set[int] = set()
    images_dir = path.resolve().parent / "images"  # absolute: the server's file sender needs it
    for line, values in rows:
        if not values:
            continue
        if len(values) < len(fields):
            raise GMADError(f"{path}, line {line}: {len(values)} fields, the header has {len(fields)}")
        row = dict(zip(fields, values))
        for text in TEXT_COLUMNS:  # written through tables.safe_cell: undo its escape
            row[text] = read_cell(row[text])
        try:
            pair, level = int(row["pair"]), int(row["level"])
        except (TypeError, ValueError):
            raise GMADError(f"{path}, line {line}: pair and level must be integers, got "
                            f"{row['pair']!r}, {row['level']!r}") from None
        if not 0 <= pair <= MAX_PAIR or level < 0:
            raise GMADError(f"{path}, line {line}: pair must be in [0, {MAX_PAIR}] and level >= 0")
        if pair in seen:
            raise GMADError(f"{path}, line {line}: pair {pair} appears twice")
        seen.add(pair)
        if not row["defender"] or not row["attacker"] or row["defender"] == row["attacker"]:
            raise GMADError(f"{path}, line {line}: defender and attacker must be two named models")
        level_images = None
        if row.get("level_images", "").strip():
            raw_n = row["level_images"].strip()
            if not raw_n.isascii() or not raw_n.isdigit() or int(raw_n) < 1:
                raise GMADError(f"{path}, line {line}: level_images must be a whole number >= 1, got {raw_n!r}")
            level_images = int(raw_n)
        images = {side: _image_file(images_dir, pair, side) if need_images else Path() for side in SIDES}
        pairs.append(GmadPair(pair=pair, defender=row["defender"], attacker=row["attacker"], level=level,
                              keys={s: row[f"{s}_key"] for s in SIDES},
                              sources={s: row[f"{s}_source"] for s in SIDES}, images=images,
                              level_images=level_images))
    if not pairs:
        raise GMADError(f"{path}: no pairs")
    models: list[str] = []
    for p in pairs:
        for m in (p.defender, p.attacker):
            if m not in models:
                models.append(m)
    return PairsFile(path=path, sha256=hashlib.sha256(raw).hexdigest(), pairs=pairs, models=models)


def _csv_rows(path: Path, text: str) -> Iterator[tuple[int, list[str]]]:
    """(line, fields) of each record of ``text``; a csv error (a field over the csv module's size
    limit, a stray quote) is a ``GMADError`` naming the file and line, not a traceback."""
    reader = csv.reader(io.StringIO(text, newline=""))
    while True:
        try:
            values = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            if "field larger than field limit" in str(exc):
                raise GMADError(f"{path}, line {reader.line_num}: a field is longer than "
                                f"{csv.field_size_limit()} characters; not a gMAD pairs file") from None
            raise GMADError(f"{path}, line {reader.line_num}: not a readable CSV row ({exc})") from None
        yield reader.line_num, values


def _image_file(images_dir: Path, pair: int, side: str) -> Path:
    """The one regular file ``images/{pair:05d}_{side}.EXT`` (EXT from the browser formats)."""
    found = [images_dir / f"{pair:05d}_{side}.{ext}" for ext in sorted(set(BROWSER_FORMATS.values()))]
    found = [f for f in found if f.is_file() and not f.is_symlink()]
    if len(found) != 1:
        what = "no image file" if not found else f"{len(found)} image files"
        raise GMADError(f"{images_dir}: {what} for pair {pair} ({side}): expected {pair:05d}_{side}.png/.jpg/...; "
                        f"run `liqe-dist gmad search` with the shards so it copies the images")
    return found[0]
