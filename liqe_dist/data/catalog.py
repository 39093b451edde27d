"""The catalog of supported datasets (``catalog.yaml``): how to pack each and how many images a
complete pack holds, so a pack that lost images (missing files, rejects) is noticed."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import yaml

CATALOG = Path(__file__).with_name("catalog.yaml")


@dataclass(frozen=True)
class CatalogEntry:
    name: str
    title: str
    kind: str     # synthetic | authentic
    images: int   # distorted images with a MOS in a complete pack
    mos: str      # the scale as packed
    pack: str     # the command that packs it


@lru_cache(maxsize=1)
def load_catalog() -> dict[str, CatalogEntry]:
    data = yaml.safe_load(CATALOG.read_text())
    return {name: CatalogEntry(name=name, **fields) for name, fields in data.items()}


def count_warning(dataset: str, samples: int, left_out: int = 0) -> str | None:
    """A warning when ``dataset`` is in the catalog and ``samples`` plus the entries its adapter
    left out on purpose (``left_out``: LIVE's negative realigned DMOS) differ from its count."""
    entry = load_catalog().get(dataset)
    if entry is None or entry.images == samples + left_out:
        return None
    left = f" and {left_out} left out" if left_out else ""
    return (f"{dataset}: {samples} images packed{left}, a complete {entry.title} has {entry.images} "
            f"(see rejects.tsv, or the dataset's files are incomplete)")


def format_catalog() -> str:
    rows = [("dataset", "kind", "images", "MOS", "pack")]
    rows += [(e.name, e.kind, str(e.images), e.mos, e.pack) for e in load_catalog().values()]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r[:4], widths)) + "  " + r[4] for r in rows)
