"""Dataset adapters: read a dataset as it is distributed and yield labelled :class:`Record` s.

``ADAPTERS`` maps a format name (as ``liqe-dist pack FORMAT`` takes it) to a reader
``fn(root: Path, dataset: str) -> list[Record]``. The reference label lists and the generic CSV
take their table or list path as ``root``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from liqe_dist.data.records import Record
from liqe_dist.data.adapters._common import DatasetFormatError
from liqe_dist.data.adapters.authentic import read_bid, read_clive, read_koniq, read_spaq
from liqe_dist.data.adapters.generic_csv import read_generic_csv
from liqe_dist.data.adapters.label_lists import read_label_lists
from liqe_dist.data.adapters.synthetic_dists import read_csiq, read_kadid, read_live, read_pipal, read_tid2013

Reader = Callable[..., list[Record]]

ADAPTERS: dict[str, Reader] = {
    "live": read_live, "csiq": read_csiq, "kadid10k": read_kadid, "tid2013": read_tid2013,
    "pipal": read_pipal, "bid": read_bid, "clive": read_clive, "koniq10k": read_koniq, "spaq": read_spaq,
    "csv": read_generic_csv,
}


def read_dataset(fmt: str, root: Path, dataset: str | None = None, lists: Path | None = None) -> list[Record]:
    """Records of a dataset. With ``lists`` (reference label lists) the labels and splits come
    from the lists and ``root`` is the image folder they are relative to."""
    dataset = dataset or fmt
    if lists is not None:
        return read_label_lists(Path(lists), Path(root), dataset)
    if fmt not in ADAPTERS:
        raise DatasetFormatError(f"unknown dataset format {fmt!r}; known: {', '.join(ADAPTERS)}")
    return ADAPTERS[fmt](Path(root), dataset)


__all__ = ["ADAPTERS", "DatasetFormatError", "read_dataset", "read_label_lists", "read_generic_csv"]
