"""The reference LIQE repository's label lists: the main way users bring scene labels.

Each list is tab-separated without a header: relative image path, MOS, fine distortion name,
scene1, scene2, scene3 ("invalid" marks an empty slot). Lists come one per dataset and split
part, in folders per split (``splits2/1/live_train_clip.txt`` ... ``splits2/10/..._test_clip.txt``);
a single list with no split folders is packed with seeded splits instead.
"""

from __future__ import annotations

import re
from pathlib import Path

from liqe_dist.data.records import Record, make_key, split_code
from liqe_dist.data.adapters._common import DatasetFormatError, read_text, to_float

_PART = re.compile(r"(train|val|test)", re.I)


def _parse_line(line: str, path: Path, lineno: int) -> tuple[str, float, str, tuple[str, ...]]:
    fields = line.rstrip("\n").split("\t")
    if len(fields) < 3:
        raise DatasetFormatError(f"{path}:{lineno}: expected path, MOS, distortion, scenes (tab-separated), "
                                 f"got {len(fields)} field(s)")
    scenes = tuple(s.strip() for s in fields[3:6] if s.strip() and s.strip() != "invalid")
    return fields[0].strip(), to_float(fields[1], path, f"line {lineno}"), fields[2].strip(), scenes


def _split_lists(root: Path) -> list[tuple[int, str, Path]]:
    """(split index, part, file) for lists in numbered split folders under ``root``."""
    found = []
    for folder in sorted((p for p in root.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name)):
        for f in sorted(folder.glob("*.txt")):
            m = _PART.search(f.stem)
            if m:
                found.append((int(folder.name), m.group(1).lower(), f))
    return found


def read_label_lists(lists: Path, image_root: Path, dataset: str, mos_higher_is_better: bool = True) -> list[Record]:
    """Records from one label list file, or from a folder of numbered split folders of lists.

    With split folders, each image's part in every split comes from the lists (``Record.splits``)
    and its labels must agree across lists.
    """
    sign = 1.0 if mos_higher_is_better else -1.0
    if lists.is_file():
        files = [(0, None, lists)]
    elif lists.is_dir():
        files = _split_lists(lists)
        if not files:
            raise DatasetFormatError(f"{lists}: no numbered split folders with *train*/*val*/*test* lists")
    else:
        raise DatasetFormatError(f"{lists}: no such label list or folder")
    n_splits = max(i for i, _, _ in files) if files[0][1] else 0
    split_ids = sorted({i for i, _, _ in files}) if n_splits else []
    records: dict[str, Record] = {}   # by relative path
    seen_in: dict[tuple[int, str], str] = {}
    for split, part, path in files:
        for lineno, line in enumerate(read_text(path).splitlines(), 1):
            if not line.strip():
                continue
            rel, mos, fine, scenes = _parse_line(line, path, lineno)
            key = make_key(dataset, rel)
            where = f"{path}:{lineno}"
            if (split, rel) in seen_in:
                raise DatasetFormatError(f"duplicate entry {rel!r}: {seen_in[(split, rel)]} and {where}")
            seen_in[(split, rel)] = where
            rec = records.get(rel)  # by path: distinct files may share a readable key
            if rec is None:
                try:
                    rec = Record(key=key, dataset=dataset, mos=sign * mos, source=where,
                                 path=str(image_root / rel), distortion_fine=fine, scenes=scenes,
                                 splits="-" * len(split_ids))
                except (KeyError, ValueError) as exc:
                    raise DatasetFormatError(f"{where}: {exc}") from None
                records[rel] = rec
            elif (rec.mos, rec.distortion_fine, rec.scenes) != (sign * mos, fine, scenes):
                raise DatasetFormatError(f"{where}: labels of {rel!r} differ from {rec.source}")
            if part:
                i = split_ids.index(split)
                if rec.splits[i] != "-":
                    raise DatasetFormatError(f"{where}: {rel!r} is in two parts of split {split}")
                rec.splits = rec.splits[:i] + split_code(part) + rec.splits[i + 1:]
    return list(records.values())
