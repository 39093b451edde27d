"""The gMAD command: scores folder -> pairs.csv, summary, images, HTML page (opened in a real
headless chromium) and PNG sheets; clear errors for a missing model and a constant defender."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import numpy as np
import pytest
import yaml
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
        assert (int(row["level_images"]), int(row["candidates"])) == (pair.level_images, pair.candidates)
        assert float(row["level_centre"]) == pytest.approx(pair.centre) and float(row["level_delta"]) == pytest.approx(
            pair.delta)
        for side, idx in (("best", pair.best), ("worst", pair.worst)):
            for m in "abc":
                assert float(row[f"{side}_{m}"]) == arrays[m][idx]
    used = [r[f"{s}_key"] for r in rows for s in ("best", "worst")]
    assert len(used) > len(set(used))  # images are reused by default, as in the toolbox
    assert not any(scores[k][4] == "p13.png" for k in used)  # the unscored image is left out
    for r in rows:  # the page's images are the packed bytes, not re-encoded
        for side in ("best", "worst"):
            [shown] = (tmp_path / "g" / "images").glob(f"{int(r['pair']):05d}_{side}.*")  # p05_copy.bmp stays .bmp
            assert shown.read_bytes() == (root / "photos" / r[f"{side}_source"]).read_bytes()
    summary = list(csv.DictReader(open(tmp_path / "g" / "summary.csv")))
    assert len(summary) == 6 and all(int(s["pairs"]) + int(s["skipped_levels"]) == 4 for s in summary)
    skipped = list(csv.DictReader(open(tmp_path / "g" / "skipped.csv")))
    assert [(s["defender"], s["attacker"], int(s["level"]), int(s["level_images"])) for s in skipped] == [
        (s.defender, s.attacker, s.level, s.level_images) for s in expected.skipped]
    sheets = sorted(p.name for p in (tmp_path / "g" / "sheets").glob("*.png"))
    # a sheet for every (defender, attacker) that has pairs
    assert sheets == sorted(f"{s['defender']}_vs_{s['attacker']}.png" for s in summary if int(s["pairs"]))
    assert len(sheets) >= 4
    recorded = yaml.safe_load((tmp_path / "g" / "config.yaml").read_text())  # provenance of the folder
    assert recorded["models"] == ["a", "b", "c"] and recorded["rule"]["levels"] == 4
    # toolbox levels, Δ = 0.09 x each defender's range: a 0..9, b 0..12, c -39..0
    assert recorded["level_rule"] == "toolbox" and recorded["rule"]["reuse"] is True
    assert recorded["delta"] == pytest.approx({"a": 0.81, "b": 1.08, "c": 3.51})
    page = (tmp_path / "g" / "index.html").read_text()
    assert "level rule toolbox" in page and "a 0.81" in page
    assert json.loads((tmp_path / "g" / "run.json").read_text())["runs"][-1]["pairs"] == len(rows)


@pytest.mark.slow  # 8-19 s of CLI runs: the full suite runs it
def test_without_reuse_the_order_of_models_changes_nothing(scored, tmp_path):
    """--no-reuse: each image in one pair at most, and --models a b c, c a b and b c a give the same
    pairs (listed in the order given); every pair's two image files are written."""
    root, _ = scored
    found = {}
    for models in (["a", "b", "c"], ["c", "a", "b"], ["b", "c", "a"]):
        out = tmp_path / "".join(models)
        proc = run_gmad(str(root / "scores"), "--models", *models, "--levels", "4", "--no-reuse", "--out", str(out))
        assert proc.returncode == 0, proc.stderr
        rows = list(csv.DictReader(open(out / "pairs.csv")))
        used = [r[f"{s}_key"] for r in rows for s in ("best", "worst")]
        assert len(used) == len(set(used)) and len(rows) > 6
        found["".join(models)] = {(r["defender"], r["attacker"], r["level"], r["best_key"], r["worst_key"])
                                  for r in rows}
        assert [models.index(r["defender"]) for r in rows] == sorted(models.index(r["defender"]) for r in rows)
        assert yaml.safe_load((out / "config.yaml").read_text())["rule"]["reuse"] is False
    assert found["abc"] == found["cab"] == found["bca"]


def test_reused_images_are_copied_for_every_pair(scored, tmp_path):
    """Overlapping toolbox windows (--delta 3 on a's 0..9) put an image in several pairs: each pair
    has its own two files (what the study reads), the same bytes."""
    root, _ = scored
    out = tmp_path / "g"
    proc = run_gmad(str(root / "scores"), "--models", "a", "b", "--levels", "4", "--delta", "3", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    rows = list(csv.DictReader(open(out / "pairs.csv")))
    keys = [r[f"{s}_key"] for r in rows for s in ("best", "worst")]
    assert len(keys) > len(set(keys))
    for r in rows:
        for side in ("best", "worst"):
            [shown] = (out / "images").glob(f"{int(r['pair']):05d}_{side}.*")
            assert shown.read_bytes() == (root / "photos" / r[f"{side}_source"]).read_bytes()
    from liqe_dist.gmad.pairs import read_pairs

    assert len(read_pairs(out / "pairs.csv").pairs) == len(rows)


@pytest.mark.slow  # 8-19 s of CLI runs: the full suite runs it
def test_search_options_are_checked_naming_the_flag(scored, tmp_path):
    root, _ = scored
    for args, message in ((["--trim", "0.05"], "--trim applies to --levels-rule uniform or quantile"),
                          (["--levels-rule", "uniform", "--delta", "1"], "--delta applies to --levels-rule toolbox"),
                          (["--delta", "-1"], "--delta must be a finite number > 0"),
                          (["--levels-rule", "quantile", "--width", "0.9"], "--width must be in (0, 0.5]")):
        proc = run_gmad(str(root / "scores"), "--models", "a", "b", *args, "--out", str(tmp_path / "g"))
        assert proc.returncode == 2 and message in proc.stderr, (args, proc.stderr)
    proc = run_gmad(str(root / "scores"), "--models", "a", "b", "--kind", "uniform", "--out", str(tmp_path / "g"))
    assert proc.returncode == 2 and "--kind" in proc.stderr  # gone: --levels-rule says it
    proc = run_gmad(str(root / "scores"), "--models", "a", "b", "--levels-rule", "quantile", "--levels", "3",
                    "--out", str(tmp_path / "q"))
    assert proc.returncode == 0, proc.stderr
    recorded = yaml.safe_load((tmp_path / "q" / "config.yaml").read_text())
    assert recorded["rule"] == {"levels": 3, "levels_rule": "quantile", "delta": None, "trim": 0.01, "width": 0.25,
                                "min_images": 2, "reuse": True}


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


@pytest.mark.slow  # 8-19 s of CLI runs: the full suite runs it
def test_missing_model_and_constant_defender_are_clear_errors(scored, tmp_path):
    root, _ = scored
    proc = run_gmad(str(root / "scores"), "--models", "a", "zzz", "--out", str(tmp_path / "g"))
    assert proc.returncode == 2 and "no scores for model(s) ['zzz']" in proc.stderr
    proc = run_gmad(str(root / "scores"), "--models", "flat", "a", "--out", str(tmp_path / "g"))
    assert proc.returncode == 2 and "defender's scores are constant" in proc.stderr
    proc = run_gmad(str(tmp_path), "--models", "a", "b")
    assert proc.returncode == 2 and "not a score-shards output folder" in proc.stderr


def tree(folder) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_out_must_be_a_folder_the_command_owns_apart_from_its_inputs(scored, tmp_path, caplog):
    from liqe_dist.cli import main

    root, _ = scored
    search_args = [str(root / "scores"), "--models", "a", "b", "--levels", "3"]
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "pairs.csv").write_text("my own table\n")
    before = tree(mine)
    assert main(["gmad", "search", *search_args, "--out", str(mine)]) == 2
    assert "holds files not written" in caplog.text and tree(mine) == before
    for out, message in ((root / "scores" / "g", "lies inside the input"),
                         (root / "shards" / "photos" / "g", "lies inside the input"),
                         (root / "shards", "holds the input")):
        caplog.clear()
        assert main(["gmad", "search", *search_args, "--out", str(out)]) == 2, out
        assert message in caplog.text and not (out / "pairs.csv").exists()
    assert not (root / "scores" / "g").exists() and not (root / "shards" / "photos" / "g").exists()


@pytest.mark.slow  # 8-19 s of CLI runs: the full suite runs it
def test_a_rerun_replaces_its_own_outputs_only(scored, tmp_path):
    """The second search (fewer models and levels) into the same folder: images/ and sheets/ hold
    exactly the new pairs' files; the user's file beside them stays."""
    root, _ = scored
    out = tmp_path / "g"
    assert run_gmad(str(root / "scores"), "--models", "a", "b", "c", "--levels", "4", "--out", str(out)).returncode == 0
    first = len(list((out / "images").iterdir()))
    (out / "notes.txt").write_text("mine")
    proc = run_gmad(str(root / "scores"), "--models", "b", "a", "--levels", "2", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    rows = list(csv.DictReader(open(out / "pairs.csv")))
    assert 0 < 2 * len(rows) < first
    assert sorted(p.stem for p in (out / "images").iterdir()) == sorted(
        f"{int(r['pair']):05d}_{side}" for r in rows for side in ("best", "worst"))
    assert {p.name for p in (out / "sheets").iterdir()} <= {"a_vs_b.png", "b_vs_a.png"}
    assert (out / "notes.txt").read_text() == "mine"
    # a link where images/ was is not followed: refused, the folder it points to untouched
    (out / "images").rename(out / "elsewhere")
    (out / "images").symlink_to(out / "elsewhere")
    proc = run_gmad(str(root / "scores"), "--models", "b", "a", "--levels", "2", "--out", str(out))
    assert proc.returncode == 2 and "not a folder this project wrote" in proc.stderr
    assert len(list((out / "elsewhere").iterdir())) == 2 * len(rows)


def test_model_names_must_be_plain_names(scored, tmp_path):
    """A scores column named ``../../x`` would put its sheet outside --out: refused, nothing written."""
    from gmad_fixtures import copy_scores, with_column

    root, _ = scored
    scores = copy_scores(root / "scores", tmp_path / "work" / "scores",
                         lambda name, t: with_column(t, "../../x", t["b"].to_pylist()))
    out = tmp_path / "work" / "out" / "g"
    proc = run_gmad(str(scores), "--models", "../../x", "a", "--levels", "3", "--out", str(out))
    assert proc.returncode == 2 and "model name '../../x' must be one plain name" in proc.stderr
    assert not list(tmp_path.rglob("x_vs_a.png")) and not out.exists()


def test_csv_text_cells_are_escaped_and_numbers_are_not(scored, tmp_path):
    """Sources that start like spreadsheet formulas are written with a leading ' (read_cell undoes
    it); negative scores stay numbers."""
    from gmad_fixtures import copy_scores, with_column
    from liqe_dist.tables import read_cell

    root, _ = scored
    starts = ["=HYPERLINK(\"http://x\")", "+", "-", "@", "\t", "'"]

    def hostile(name, table):
        return with_column(table, "source", [starts[i % len(starts)] + s
                                             for i, s in enumerate(table["source"].to_pylist())])

    scores = copy_scores(root / "scores", tmp_path / "scores", hostile)
    proc = run_gmad(str(scores), "--models", "a", "c", "--levels", "4", "--out", str(tmp_path / "g"))
    assert proc.returncode == 0, proc.stderr
    rows = list(csv.DictReader(open(tmp_path / "g" / "pairs.csv", newline="")))
    sources = [r[f"{side}_source"] for r in rows for side in ("best", "worst")]
    assert sources and all(s.startswith("'") for s in sources)
    assert all(read_cell(s)[0] in "=+-@\t'" and read_cell(s).endswith((".png", ".bmp")) for s in sources)
    negative = [r["best_c"] for r in rows if float(r["best_c"]) < 0]
    assert negative and all(v.startswith("-") for v in negative)   # a number, not text
    assert all(not r["level_centre"].startswith("'") for r in rows)


def test_escaped_cells_of_pairs_csv_read_back_as_written(scored, tmp_path):
    """pairs.csv escapes text that a spreadsheet would run (a key starting with '-'); the study
    reads the cells back as they were."""
    from liqe_dist.gmad.pairs import read_pairs
    from liqe_dist.tables import write_csv

    row = {"pair": 0, "defender": "-d", "attacker": "=a", "level": 1, "best_key": "@k", "worst_key": "'w",
           "best_source": "+s.png", "worst_source": "plain.png"}
    write_csv(tmp_path / "pairs.csv", [row])
    assert (tmp_path / "pairs.csv").read_text().splitlines()[1].startswith("0,'-d,'=a,1,'@k,''w")
    [pair] = read_pairs(tmp_path / "pairs.csv", need_images=False).pairs
    assert (pair.defender, pair.attacker, pair.keys, pair.sources) == (
        "-d", "=a", {"best": "@k", "worst": "'w"}, {"best": "+s.png", "worst": "plain.png"})
