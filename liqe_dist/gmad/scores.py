"""Reading a ``score-shards`` folder for the gMAD search, and fetching the images of the pairs
from their shards.

The scores are read column by column (only the key, shard, source, content hash, error and the
searched models' columns) and put in key order, the order the search breaks ties in. Rows with an
error or a non-finite score of a searched model are left out and counted.

Rules:
- The manifest must be a JSON object; its ``inputs`` a list of paths. Errors name the file.
- Model names follow score-shards' rule (:func:`liqe_dist.eval.score_shards.check_name`): they name columns and files.
- The part files read are the ones the manifest lists (``parts``, when it has them; unlisted
  ones are left out with a warning), else every ``*.parquet``; each one's schema is checked: a
  file lacking a column, or with a model column that is not numeric, is an error naming both.
- A model with no finite score on any image is an error naming it (not an empty search).
- An image without a content hash (null or empty) is its own: never merged with another.
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
    ``hashes`` (N,) object arrays ("" where an image has no content hash); ``scores`` model ->
    (N,) float64; ``dropped``: rows left out; ``folder``: where it was read from."""

    keys: np.ndarray
    shards: np.ndarray
    sources: np.ndarray
    hashes: np.ndarray
    scores: dict[str, np.ndarray]
    dropped: int
    manifest: dict
    folder: Path | None = None


TEXT_COLUMNS = ("key", "shard", "source", "content_hash", "error")


def check_model_names(models: list[str]) -> None:
    """GMADError unless every model name is one score-shards accepts (a plain name: the sheets
    are ``D_vs_A.png``)."""
    from liqe_dist.eval.score_shards import ScoreShardsError, check_name

    for m in models:
        try:
            check_name(m)
        except ScoreShardsError as exc:
            raise GMADError(str(exc)) from None


def read_manifest(scores_dir: Path) -> dict:
    """The scores' manifest: a JSON object whose ``inputs`` (if any) is a list of paths."""
    path = scores_dir / "manifest.json"
    if not path.is_file():
        raise GMADError(f"{scores_dir}: no manifest.json (not a score-shards output folder)")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise GMADError(f"{path}: unreadable manifest ({exc})") from None
    if not isinstance(manifest, dict):
        raise GMADError(f"{path}: not a scores manifest (a JSON {type(manifest).__name__}, expected an object)")
    inputs = manifest.get("inputs", [])
    if not isinstance(inputs, list) or not all(isinstance(i, str) for i in inputs):
        raise GMADError(f"{path}: 'inputs' must be a list of paths")
    return manifest


def part_files(scores_dir: Path, manifest: dict) -> list[Path]:
    """The part files to read: the ones the manifest lists, when it lists any (a file it does
    not list is not one score-shards finished), else every ``*.parquet``."""
    files = sorted(scores_dir.glob("*.parquet"))
    listed = manifest.get("parts")
    if isinstance(listed, dict):
        foreign = [f.name for f in files if f.name not in listed]
        if foreign:
            log.warning("%s: %d part file(s) the manifest does not list are left out (%s)", scores_dir,
                        len(foreign), ", ".join(foreign[:3]))
        files = [f for f in files if f.name in listed]
    if not files:
        raise GMADError(f"{scores_dir}: no scores (*.parquet) yet")
    return files


def _read_part(path: Path, models: list[str], known: list[str]):
    """The columns of one part file as a pyarrow table (text columns as strings, scores as
    float64); GMADError naming the file and the column it lacks or cannot use."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
    except Exception as exc:  # pyarrow raises its own error types for a damaged file
        raise GMADError(f"{path}: not a readable parquet file ({exc})") from None
    missing = [m for m in models if m not in schema.names]
    if missing:
        raise GMADError(f"{path}: no scores for model(s) {missing}; the scores have {known}")
    for col in TEXT_COLUMNS:
        if col not in schema.names:
            raise GMADError(f"{path}: no column {col!r} (not a score-shards part file)")
    for m in models:
        kind = schema.field(m).type
        if not (pa.types.is_floating(kind) or pa.types.is_integer(kind)):
            raise GMADError(f"{path}: model {m!r}'s column holds {kind}, not numbers")
    table = pq.read_table(path, columns=[*TEXT_COLUMNS, *models])
    return pa.table({**{c: table[c].cast(pa.string()) for c in TEXT_COLUMNS},
                     **{m: table[m].cast(pa.float64()) for m in models}})


def read_scores(scores_dir: str | Path, models: list[str]) -> Corpus:
    """The corpus as ``score-shards`` wrote it into ``scores_dir``, with the columns of ``models``."""
    import pyarrow as pa

    check_model_names(models)
    scores_dir = Path(scores_dir)
    manifest = read_manifest(scores_dir)
    files = part_files(scores_dir, manifest)
    known = sorted(manifest.get("models", {})) if isinstance(manifest.get("models"), dict) else []
    table = pa.concat_tables([_read_part(f, models, known) for f in files]).to_pandas()
    if not manifest.get("complete", False):
        log.warning("%s: not every shard is scored yet; searching the %d images scored so far", scores_dir, len(table))
    if table["key"].duplicated().any():
        raise GMADError(f"{scores_dir}: key {table['key'][table['key'].duplicated()].iloc[0]!r} is scored twice "
                        "(two shard sets with the same keys, or a key twice in one shard?)")
    scores = table[models].to_numpy(dtype=np.float64)
    unscored = [m for k, m in enumerate(models) if not np.isfinite(scores[:, k]).any()]
    if unscored:
        raise GMADError(f"{scores_dir}: model(s) {unscored} have no finite score on any image (NaN weights?)")
    ok = (table["error"].fillna("") == "") & np.isfinite(scores).all(axis=1)
    if not ok.any():
        raise GMADError(f"{scores_dir}: no image has a score of every model {models} (each failed for one of them)")
    table = table[ok].sort_values("key", kind="stable")
    return Corpus(table["key"].to_numpy(dtype=object), table["shard"].to_numpy(dtype=object),
                  table["source"].fillna("").to_numpy(dtype=object),
                  table["content_hash"].fillna("").to_numpy(dtype=object),
                  {m: table[m].to_numpy(dtype=np.float64) for m in models}, int((~ok).sum()), manifest, scores_dir)


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
