"""Dataset adapters: read a dataset as it is distributed and yield labelled :class:`Record` s.

``ADAPTERS`` maps a format name (as ``liqe-dist pack FORMAT`` takes it) to a reader
``fn(root: Path, dataset: str, **options) -> list[Record]``. The reference label lists and the
generic CSV take their table or list path as ``root``. A reader may return a :class:`Records`
(a list) whose ``left_out`` names the entries it left out on purpose; packing reports them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from liqe_dist.data.records import Record
from liqe_dist.data.adapters._common import DatasetFormatError, LeftOut, Records
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


def read_dataset(fmt: str, root: Path, dataset: str | None = None, lists: Path | None = None,
                 options: dict | None = None) -> list[Record]:
    """Records of a dataset. With ``lists`` (reference label lists) the labels and splits come
    from the lists and ``root`` is the image folder they are relative to. ``options``: keyword
    arguments of the format's reader (e.g. ``{"dmos": "realigned"}`` for live)."""
    dataset = dataset or fmt
    options = options or {}
    if lists is not None:
        if options:  # the lists carry the labels: an adapter option would be silently ignored
            raise DatasetFormatError(f"{fmt}: {', '.join(options)} cannot be used with label lists (the lists "
                                     f"carry the labels)")
        return read_label_lists(Path(lists), Path(root), dataset)
    if fmt not in ADAPTERS:
        raise DatasetFormatError(f"unknown dataset format {fmt!r}; known: {', '.join(ADAPTERS)}")
    return ADAPTERS[fmt](Path(root), dataset, **options)


__all__ = ["ADAPTERS", "DatasetFormatError", "LeftOut", "Records", "read_dataset", "read_label_lists",
           "read_generic_csv"]
