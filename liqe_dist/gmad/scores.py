"""Reading a ``score-shards`` folder for the gMAD search, and fetching the images of the pairs
from their shards.

The scores are read column by column (only the key, shard, source, content hash, error and the
searched models' columns) and put in key order, the order the search breaks ties in. Rows with an
error or a non-finite score of a searched model are left out and counted.
"""

from __future__ import annotations

import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from liqe_dist.gmad.search import GMADError

log = logging.getLogger(__name__)

#: Formats a browser shows as they are; others (TIFF, PPM...) are converted to PNG for the pages.
BROWSER_FORMATS = {"jpg": "jpg", "jpeg": "jpg", "png": "png", "bmp": "bmp", "gif": "gif", "webp": "webp"}


@dataclass
class Corpus:
    """The scored corpus in key order: ``keys``, ``shards`` (shard file names), ``sources``,
    ``hashes`` (N,) object arrays; ``scores`` model -> (N,) float64; ``dropped``: rows left out."""

    keys: np.ndarray
    shards: np.ndarray
    sources: np.ndarray
    hashes: np.ndarray
    scores: dict[str, np.ndarray]
    dropped: int
    manifest: dict


def read_scores(scores_dir: str | Path, models: list[str]) -> Corpus:
    """The corpus as ``score-shards`` wrote it into ``scores_dir``, with the columns of ``models``."""
    import pyarrow.dataset as ds

    scores_dir = Path(scores_dir)
    manifest_path = scores_dir / "manifest.json"
    if not manifest_path.is_file():
        raise GMADError(f"{scores_dir}: no manifest.json (not a score-shards output folder)")
    manifest = json.loads(manifest_path.read_text())
    files = sorted(scores_dir.glob("*.parquet"))
    if not files:
        raise GMADError(f"{scores_dir}: no scores (*.parquet) yet")
    dataset = ds.dataset([str(f) for f in files], format="parquet")
    have = set(dataset.schema.names)
    missing = [m for m in models if m not in have]
    if missing:
        known = sorted(manifest.get("models", {}))
        raise GMADError(f"{scores_dir}: no scores for model(s) {missing}; it has {known}")
    table = dataset.to_table(columns=["key", "shard", "source", "content_hash", "error", *models]).to_pandas()
    if not manifest.get("complete", False):
        log.warning("%s: not every shard is scored yet; searching the %d images scored so far", scores_dir, len(table))
    if table["key"].duplicated().any():
        raise GMADError(f"{scores_dir}: key {table['key'][table['key'].duplicated()].iloc[0]!r} is scored twice "
                        "(two shard sets with the same keys?)")
    ok = (table["error"] == "") & np.isfinite(table[models].to_numpy(dtype=np.float64)).all(axis=1)
    table = table[ok].sort_values("key", kind="stable")
    hashes = table["content_hash"].to_numpy(dtype=object)
    hashes = np.where(hashes == "", table["key"].to_numpy(dtype=object), hashes)  # no hash: the image is its own
    return Corpus(table["key"].to_numpy(dtype=object), table["shard"].to_numpy(dtype=object),
                  table["source"].to_numpy(dtype=object), hashes,
                  {m: table[m].to_numpy(dtype=np.float64) for m in models}, int((~ok).sum()), manifest)


def shard_paths(manifest: dict, extra: list[str | Path] = ()) -> dict[str, Path]:
    """Shard file name -> path, from the inputs the scores' manifest records (and ``extra``
    shard sets or tars, for shards that moved)."""
    from liqe_dist.data.packing import read_manifest

    out: dict[str, Path] = {}
    for item in [*manifest.get("inputs", []), *extra]:
        item = Path(item)
        if item.is_dir() and (item / "manifest.json").exists():
            for s in read_manifest(item)["shards"]:
                out[s["name"]] = item / s["name"]
        elif item.is_file():
            out[item.name] = item
    return out


def extract_images(wanted: dict[str, str], corpus: Corpus, paths: dict[str, Path], out_dir: Path) -> dict[str, str]:
    """Copy the images ``wanted`` (key -> file stem) out of their shards into ``out_dir``;
    returns key -> file name. File names are the given stems and an extension from a fixed list,
    never a name read from a shard; images a browser cannot show are converted to PNG."""
    from PIL import Image

    from liqe_dist.data.stream import iter_shard

    out_dir.mkdir(parents=True, exist_ok=True)
    shard_of = dict(zip(corpus.keys, corpus.shards))
    by_shard: dict[str, set[str]] = {}
    for key in wanted:
        by_shard.setdefault(shard_of[key], set()).add(key)
    names: dict[str, str] = {}
    for shard, keys in sorted(by_shard.items()):
        if shard not in paths:
            raise GMADError(f"shard {shard} (of image {sorted(keys)[0]}) not found; name its shard set with --shards")
        for raw in iter_shard(paths[shard]):
            if raw.key not in keys:
                continue
            ext = next((k for k in raw.fields if k != "json"), "")
            data = raw.fields.get(ext, b"")
            fmt = BROWSER_FORMATS.get(ext.lower())
            if fmt is None:
                buf = io.BytesIO()
                Image.open(io.BytesIO(data)).convert("RGB").save(buf, "PNG")
                data, fmt = buf.getvalue(), "png"
            names[raw.key] = f"{wanted[raw.key]}.{fmt}"
            (out_dir / names[raw.key]).write_bytes(data)
    lost = sorted(set(wanted) - set(names))
    if lost:
        raise GMADError(f"image(s) {lost[:3]} not found in their shards (were the shards changed after scoring?)")
    return names
