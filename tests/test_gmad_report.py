"""The gMAD command: scores folder -> pairs.csv, summary, images, HTML page (opened in a real
headless chromium) and PNG sheets; clear errors for a missing model and a constant defender."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from gmad_fixtures import browser, make_scored
from liqe_dist.data.stream import iter_shard
from liqe_dist.gmad.search import LevelRule, search


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    return make_scored(tmp_path_factory.mktemp("gmad"))


def run_gmad(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "liqe_dist.cli", "gmad", "search", *args], capture_output=True,
                          text=True)


def test_pairs_csv_matches_the_search_and_images_are_the_originals(scored, tmp_path):
    root, scores = scored
    proc = run_gmad(str(root / "scores"), "--models", "a", "b", "c", "--levels", "4", "--out", str(tmp_path / "g"))
    assert proc.returncode == 0, proc.stderr
    assert "defender" in proc.stdout and "mean rank gap" in proc.stdout
    # the expected pairs: the search on the same scores in key order, without the failed image
    keys = sorted(k for k, v in scores.items() if not v[3])
    arrays = {m: np.array([scores[k][i] for k in keys]) for i, m in enumerate("abc")}
    hashes = {}
    for shard in sorted((root / "shards" / "photos").glob("*.tar")):
        for raw in iter_shard(shard):
            hashes[raw.key] = json.loads(raw.fields["json"])["content_hash"]
    expected = search(arrays, ["a", "b", "c"], LevelRule(levels=4), np.array([hashes[k] for k in keys]))
    with open(tmp_path / "g" / "pairs.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(expected.pairs) > 6
    for row, pair in zip(rows, expected.pairs):
        assert (row["defender"], row["attacker"], int(row["level"])) == (pair.defender, pair.attacker, pair.level)
        assert (row["best_key"], row["worst_key"]) == (keys[pair.best], keys[pair.worst])
        for side, idx in (("best", pair.best), ("worst", pair.worst)):
            for m in "abc":
                assert float(row[f"{side}_{m}"]) == arrays[m][idx]
    used = [r[f"{s}_key"] for r in rows for s in ("best", "worst")]
    assert len(used) == len(set(used))  # no image in two pairs
    assert not any(scores[k][4] == "p13.png" for k in used)  # the unscored image is left out
    for r in rows:  # the page's images are the packed bytes, not re-encoded
        for side in ("best", "worst"):
            shown = tmp_path / "g" / "images" / f"{int(r['pair']):05d}_{side}.png"
            assert shown.read_bytes() == (root / "photos" / r[f"{side}_source"]).read_bytes()
    summary = list(csv.DictReader(open(tmp_path / "g" / "summary.csv")))
    assert len(summary) == 6 and all(int(s["pairs"]) + int(s["skipped_levels"]) == 4 for s in summary)
    sheets = sorted(p.name for p in (tmp_path / "g" / "sheets").glob("*.png"))
    # a sheet for every (defender, attacker) that has pairs (late pairs find their images used up)
    assert sheets == sorted(f"{s['defender']}_vs_{s['attacker']}.png" for s in summary if int(s["pairs"]))
    assert len(sheets) >= 4


@pytest.mark.slow
def test_page_opens_in_headless_chromium(scored, tmp_path):
    root, _ = scored
    chromium, why = browser()
    if chromium is None:
        pytest.skip(f"no chromium: {why}")
    assert run_gmad(str(root / "scores"), "--models", "a", "b", "--levels", "3", "--out",
                    str(tmp_path / "g")).returncode == 0
    pairs = sum(1 for _ in open(tmp_path / "g" / "pairs.csv")) - 1
    page = (tmp_path / "g" / "index.html").as_uri()
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=10000",
             f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([chromium, *flags, "--dump-dom", page], capture_output=True, text=True, timeout=120)
    assert f'data-loaded="{2 * pairs}"' in dom.stdout, dom.stdout[:500] + dom.stderr[-2000:]
    assert dom.stdout.count("<figure>") == 2 * pairs
    shot = tmp_path / "shot.png"
    subprocess.run([chromium, *flags, "--window-size=1000,1400", f"--screenshot={shot}", page],
                   capture_output=True, timeout=120)
    image = np.asarray(Image.open(shot).convert("L"), dtype=np.float32)
    assert image.shape == (1400, 1000)
    assert image.std() > 30  # noise images and text, not a blank page


def test_missing_model_and_constant_defender_are_clear_errors(scored, tmp_path):
    root, _ = scored
    proc = run_gmad(str(root / "scores"), "--models", "a", "zzz", "--out", str(tmp_path / "g"))
    assert proc.returncode == 2 and "no scores for model(s) ['zzz']" in proc.stderr
    proc = run_gmad(str(root / "scores"), "--models", "flat", "a", "--out", str(tmp_path / "g"))
    assert proc.returncode == 2 and "defender's scores are constant" in proc.stderr
    proc = run_gmad(str(tmp_path), "--models", "a", "b")
    assert proc.returncode == 2 and "not a score-shards output folder" in proc.stderr
