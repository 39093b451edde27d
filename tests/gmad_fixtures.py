"""A small scored corpus for the gMAD tests: 40 packed noise images and a score-shards-like folder
with hand-made scores of models a, b, c (and a constant one, flat); one image's scoring failed and
two images share their pixels. Also the browser (Debian's chromium + chromedriver) the page and
study tests drive."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from liqe_dist.data.corpus import CorpusConfig, pack_corpus
from liqe_dist.data.stream import iter_shard

REPO = Path(__file__).resolve().parents[1]
N = 40


def make_scored(root: Path) -> tuple[Path, dict]:
    """Write the corpus under ``root``; returns root and key -> (a, b, c, broken, source)."""
    rng = np.random.default_rng(3)
    (root / "photos").mkdir()
    for i in range(N):
        pixels = rng.integers(0, 256, (40 + i, 60, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / "photos" / f"p{i:02d}.png")
    Image.open(root / "photos" / "p05.png").save(root / "photos" / "p05_copy.bmp")
    pack_corpus(root / "photos", root / "shards" / "photos", "photos", CorpusConfig(shard_max_count=8, workers=1),
                progress=False)
    out = root / "scores"
    out.mkdir()
    scores = {}
    for shard in sorted((root / "shards" / "photos").glob("*.tar")):
        rows = {"key": [], "shard": [], "source": [], "content_hash": [], "error": [], "a": [], "b": [], "c": [],
                "flat": []}
        for raw in iter_shard(shard):
            meta = json.loads(raw.fields["json"])
            i = int(meta["source"][1:3])
            rows["key"].append(raw.key)
            rows["shard"].append(shard.name)
            rows["source"].append(meta["source"])
            rows["content_hash"].append(meta["content_hash"])
            broken = meta["source"] == "p13.png"
            rows["error"].append("cannot decode" if broken else "")
            a, b, c = float(i % 10), float((i * 7) % 13), float(-i)
            rows["a"].append(float("nan") if broken else a)
            rows["b"].append(b)
            rows["c"].append(c)
            rows["flat"].append(1.0)
            scores[raw.key] = (a, b, c, broken, meta["source"])
        pq.write_table(pa.table(rows), out / shard.name.replace(".tar", ".parquet"))
    (out / "manifest.json").write_text(json.dumps({"format": "liqe-dist/scores-1", "complete": True,
                                                   "models": {"a": {}, "b": {}, "c": {}, "flat": {}},
                                                   "inputs": [str(root / "shards" / "photos")]}))
    return root, scores


def browser(driver: bool = False) -> tuple[str | None, str]:
    """(path of chromium, or of chromedriver with ``driver``; None if missing) and why not:
    launch/browser.sh finds them, or installs Debian's packages when this is root."""
    proc = subprocess.run(["bash", str(REPO / "launch" / "browser.sh"), *(["--driver"] if driver else [])],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        return None, proc.stderr.strip()
    return proc.stdout.strip().splitlines()[-1], ""


def copy_scores(scores: Path, dest: Path, edit=None, manifest=None) -> Path:
    """A copy of the scores folder ``scores`` at ``dest``: each part file through ``edit(name,
    table) -> table`` (None: as it is), the manifest through ``manifest(dict) -> object`` and
    written as JSON (None: as it is)."""
    dest.mkdir(parents=True)
    for part in sorted(scores.glob("*.parquet")):
        table = pq.read_table(part)
        pq.write_table(edit(part.name, table) if edit else table, dest / part.name)
    text = (scores / "manifest.json").read_text()
    (dest / "manifest.json").write_text(json.dumps(manifest(json.loads(text))) if manifest else text)
    return dest


def with_column(table: pa.Table, name: str, values) -> pa.Table:
    """``table`` with the column ``name`` set to ``values`` (replaced or appended)."""
    array = pa.array(values)
    if name in table.column_names:
        return table.set_column(table.column_names.index(name), name, array)
    return table.append_column(name, array)
