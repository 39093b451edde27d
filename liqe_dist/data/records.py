"""The labelled record every dataset adapter yields, and the JSON that travels in a shard.

A record points at its image (a file path, or bytes for generated data) and carries labels on
the dataset's own MOS scale with the direction fixed so that higher is better. A label the
source lacks is ``None`` (MOS std, distortion, reference) or empty (scenes): never invented.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from liqe_dist.data.labels import SCENES, coarse_distortion

_KEY_CHARS = re.compile(r"[^A-Za-z0-9_-]+")


def make_key(dataset: str, relative: str) -> str:
    """A shard key from a dataset name and the image's path inside the dataset: no dots (they
    separate key and extension in WebDataset; a set named ``v1.0`` gives keys ``v1_0_...``), no
    slashes; readable and stable."""
    stem = relative.rsplit(".", 1)[0] if "." in Path(relative).name else relative
    return f"{_KEY_CHARS.sub('_', dataset)}_{_KEY_CHARS.sub('_', stem).strip('_')}"


@dataclass
class Record:
    """One labelled image of a dataset."""

    key: str
    dataset: str
    mos: float | None                  # dataset's own scale, higher is better
    source: str                        # where it came from (path, or "list.txt:12")
    path: str | None = None            # image file to read, or None when ``data`` is given
    data: bytes | None = None          # image bytes (generated datasets)
    ext: str = ""                      # image file extension without the dot (jpg, png, bmp)
    mos_std: float | None = None
    distortion_fine: str | None = None
    distortion: str | None = None      # one of the 11 coarse classes
    scenes: tuple[str, ...] = ()       # 0..3 scene labels
    reference: str | None = None       # reference-image id (synthetic datasets)
    splits: str = ""                   # one letter per split: t(rain), v(al), e (test), - (none)
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if "." in self.key or "/" in self.key or not self.key:
            raise ValueError(f"{self.source}: invalid shard key {self.key!r} (no dots or slashes allowed)")
        if self.distortion_fine and not self.distortion:
            self.distortion = coarse_distortion(self.distortion_fine)
        bad = [s for s in self.scenes if s not in SCENES]
        if bad:
            raise ValueError(f"{self.source}: unknown scene label(s) {bad}; known: {', '.join(SCENES)}")
        if len(self.scenes) > 3:
            raise ValueError(f"{self.source}: at most 3 scene labels, got {len(self.scenes)}")
        if not self.ext:
            name = Path(self.path).name if self.path else ""
            self.ext = name.rsplit(".", 1)[-1].lower() if "." in name else "img"

    def labels(self) -> dict:
        """The JSON labels stored next to the image in a shard."""
        out = asdict(self)
        for drop in ("path", "data", "ext"):
            out.pop(drop)
        out["scenes"] = list(self.scenes)
        return out


def labels_to_json(labels: dict) -> bytes:
    return json.dumps(labels, sort_keys=True).encode()


#: The letter that marks each split part in a record's ``splits`` (``-``: not in that split).
PART_CODES = {"train": "t", "val": "v", "test": "e"}


def split_code(part: str) -> str:
    """'train' -> 't', 'val' -> 'v', 'test' -> 'e'."""
    if part not in PART_CODES:
        raise ValueError(f"unknown split part {part!r}; expected train, val or test")
    return PART_CODES[part]
