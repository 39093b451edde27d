"""The labels the public PMT-IQA code trains on: LIVE's realigned DMOS (--live-dmos), KonIQ's
MOS_zscore (``extra``), and the manifest's ``extra_ranges`` that scale such a label."""

from __future__ import annotations

import dataclasses
import json
import logging
import tarfile
from pathlib import Path

import numpy as np
import pytest
from scipy.io import savemat

from conftest import photo
from liqe_dist.cli import main
from liqe_dist.data.adapters import DatasetFormatError, read_dataset
from liqe_dist.data.packing import PackConfig, extra_ranges, pack_records, read_manifest
from liqe_dist.data.records import Record

# Fake LIVE, 7 entries in dmos.mat order: jp2k/img1, jp2k/img2, jpeg/img1, jpeg/img2, wn/img1,
# gblur/img1, fastfading/img1. The two label files differ in every distorted entry, and the
# realigned orgs marks the last entry as a reference too, so a test sees which file orgs came from.
LIVE_COUNTS = {"jp2k": 2, "jpeg": 2, "wn": 1, "gblur": 1, "fastfading": 1}
ORIGINAL_DMOS = [30.0, 0.0, 45.0, 60.0, -3.0, 55.0, 70.0]  # -3: kept with the original file
ORIGINAL_ORGS = [0, 1, 0, 0, 0, 0, 0]
REALIGNED_DMOS = [35.0, 0.0, -1.0, 62.0, 21.0, -2.5, 10.0]  # two negatives: left out
REALIGNED_ORGS = [0, 1, 0, 0, 0, 0, 1]


def cell(strings: list[str]) -> np.ndarray:
    arr = np.empty((1, len(strings)), dtype=object)
    for i, s in enumerate(strings):
        arr[0, i] = s
    return arr


def make_live(root: Path, original: bool = True, realigned: bool = True) -> Path:
    """A LIVE release 2 folder with dmos.mat and/or dmos_realigned.mat."""
    for i, (folder, n) in enumerate(LIVE_COUNTS.items()):
        (root / folder).mkdir(parents=True)
        for k in range(1, n + 1):
            photo(240, 240, seed=i * 3 + k).save(root / folder / f"img{k}.bmp")
    if original:
        savemat(root / "dmos.mat", {"dmos": np.array([ORIGINAL_DMOS]), "orgs": np.array([ORIGINAL_ORGS])})
    if realigned:
        savemat(root / "dmos_realigned.mat", {"dmos_new": np.array([REALIGNED_DMOS]),
                                              "orgs": np.array([REALIGNED_ORGS])})
    refs = ["bikes.bmp", "bikes.bmp", "parrots.bmp", "bikes.bmp", "house.bmp", "parrots.bmp", "house.bmp"]
    savemat(root / "refnames_all.mat", {"refnames_all": cell(refs)})
    return root


@pytest.fixture
def live_both(tmp_path) -> Path:
    return make_live(tmp_path / "databaserelease2")


def mos_by_key(records) -> dict[str, float]:
    return {r.key: r.mos for r in records}


ORIGINAL_MOS = {"live_jp2k_img1": 70.0, "live_jpeg_img1": 55.0, "live_jpeg_img2": 40.0, "live_wn_img1": 103.0,
                "live_gblur_img1": 45.0, "live_fastfading_img1": 30.0}
REALIGNED_MOS = {"live_jp2k_img1": 65.0, "live_jpeg_img2": 38.0, "live_wn_img1": 79.0}


@pytest.mark.parametrize("dmos", ["auto", "original"])
def test_live_default_and_original_read_dmos_mat(live_both, dmos):
    recs = read_dataset("live", live_both, options={"dmos": dmos})
    assert mos_by_key(recs) == ORIGINAL_MOS  # negative DMOS kept there: today's packs do not change
    assert all(r.source.startswith(f"{live_both / 'dmos.mat'}[") for r in recs)
    assert recs.left_out == []
    assert mos_by_key(read_dataset("live", live_both)) == ORIGINAL_MOS  # no option at all: the same


def test_live_realigned_reads_dmos_new_and_its_orgs(live_both, caplog):
    with caplog.at_level(logging.INFO, logger="liqe_dist"):
        recs = read_dataset("live", live_both, options={"dmos": "realigned"})
    assert mos_by_key(recs) == REALIGNED_MOS  # 100 - dmos_new; fastfading/img1 is a reference in its orgs
    by_key = {r.key: r for r in recs}
    assert by_key["live_jp2k_img1"].source == f"{live_both / 'dmos_realigned.mat'}[0]"
    assert by_key["live_wn_img1"].distortion_fine == "wn" and by_key["live_wn_img1"].reference == "house"
    left = {Path(e.path).relative_to(live_both).as_posix(): e for e in recs.left_out}
    assert set(left) == {"jpeg/img1.bmp", "gblur/img1.bmp"}
    assert left["jpeg/img1.bmp"].source == f"{live_both / 'dmos_realigned.mat'}[2]"
    assert "negative dmos_new (-1)" in left["jpeg/img1.bmp"].reason
    assert "negative dmos_new (-2.5)" in left["gblur/img1.bmp"].reason
    assert "dmos_realigned.mat (realigned, MOS = 100 - dmos_new)" in caplog.text  # which file: logged
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("left out 2 image(s) whose dmos_new is negative" in m for m in warned), warned


def test_live_auto_falls_back_to_the_realigned_file(tmp_path):
    root = make_live(tmp_path / "live", original=False)
    recs = read_dataset("live", root)
    assert mos_by_key(recs) == REALIGNED_MOS and len(recs.left_out) == 2


def test_live_realigned_missing_is_a_clear_error(tmp_path):
    root = make_live(tmp_path / "live", realigned=False)
    with pytest.raises(DatasetFormatError, match=r"dmos_realigned\.mat: missing \(LIVE realigned DMOS"):
        read_dataset("live", root, options={"dmos": "realigned"})
    with pytest.raises(ValueError, match="auto, original or realigned"):
        read_dataset("live", root, options={"dmos": "new"})


def test_live_realigned_count_mismatch_names_the_realigned_file(live_both):
    savemat(live_both / "dmos_realigned.mat", {"dmos_new": np.array([REALIGNED_DMOS[:6]]),
                                               "orgs": np.array([REALIGNED_ORGS])})
    with pytest.raises(DatasetFormatError, match=r"dmos_realigned\.mat: 6 DMOS, 7 orgs"):
        read_dataset("live", live_both, options={"dmos": "realigned"})


def test_options_are_refused_with_label_lists(live_both, tmp_path):
    with pytest.raises(DatasetFormatError, match="cannot be used with label lists"):
        read_dataset("live", live_both, lists=tmp_path / "lists.txt", options={"dmos": "realigned"})


def shard_labels(shard_dir: Path) -> dict[str, dict]:
    """Every sample's JSON labels in a packed set, by key (read with tarfile, apart from the stream)."""
    out = {}
    for entry in read_manifest(shard_dir)["shards"]:
        with tarfile.open(shard_dir / entry["name"]) as t:
            for m in t.getmembers():
                if m.name.endswith(".json"):
                    out[m.name[: -len(".json")]] = json.loads(t.extractfile(m).read())
    return out


def rejects_rows(shard_dir: Path) -> list[list[str]]:
    lines = (shard_dir / "rejects.tsv").read_text().splitlines()
    assert lines[0] == "source\tpath\treason"
    return [line.split("\t") for line in lines[1:]]


def test_pack_realigned_lists_the_left_out_entries(live_both, tmp_path):
    recs = read_dataset("live", live_both, options={"dmos": "realigned"})
    out = tmp_path / "shards" / "live"
    result = pack_records(recs, out, "live", {"format": "live"}, PackConfig(workers=1), progress=False)
    assert (result.samples, result.rejected, result.left_out) == (3, 0, 2)
    assert "2 left out by the adapter" in result.summary("live")
    manifest = read_manifest(out)
    assert (manifest["samples"], manifest["rejected"], manifest["left_out"]) == (3, 0, 2)
    assert manifest["mos_range"] == [38.0, 79.0]
    rows = rejects_rows(out)
    assert sorted(Path(r[1]).name for r in rows) == ["img1.bmp", "img1.bmp"]
    assert all("dmos_realigned.mat[" in r[0] and "negative dmos_new" in r[2] for r in rows)
    assert {k: v["mos"] for k, v in shard_labels(out).items()} == REALIGNED_MOS
    again = pack_records(read_dataset("live", live_both, options={"dmos": "realigned"}), out, "live",
                         {"format": "live"}, PackConfig(workers=1), progress=False)
    assert again.skipped and again.left_out == 2  # an unchanged set still says what was left out


def test_pack_original_has_no_left_out(live_both, tmp_path):
    out = tmp_path / "shards" / "live"
    result = pack_records(read_dataset("live", live_both), out, "live", {}, PackConfig(workers=1), progress=False)
    assert (result.samples, result.left_out) == (6, 0) and rejects_rows(out) == []
    assert read_manifest(out)["left_out"] == 0 and read_manifest(out)["extra_ranges"] == {}


def test_cli_live_dmos_reaches_the_adapter(live_both, tmp_path, caplog):
    out = tmp_path / "shards"
    base = ["pack", "live", str(live_both), "--out", str(out), "--no-progress", "--workers", "1"]
    with caplog.at_level(logging.INFO, logger="liqe_dist"):
        assert main(base + ["--live-dmos", "realigned"]) == 0
    assert {k: v["mos"] for k, v in shard_labels(out / "live").items()} == REALIGNED_MOS
    assert all("dmos_realigned.mat[" in v["source"] for v in shard_labels(out / "live").values())
    assert read_manifest(out / "live")["left_out"] == 2
    assert "2 entries left out by the live adapter" in caplog.text
    assert main(base + ["--live-dmos", "original"]) == 0  # another label file: the set is rebuilt
    assert {k: v["mos"] for k, v in shard_labels(out / "live").items()} == ORIGINAL_MOS
    assert main(base) == 0  # default (auto): dmos.mat, the same set, so up to date
    assert "up to date" in caplog.text


def test_cli_live_dmos_errors(live_both, tmp_path, caplog):
    out = tmp_path / "shards"
    no_realigned = make_live(tmp_path / "only_original", realigned=False)
    assert main(["pack", "live", str(no_realigned), "--live-dmos", "realigned", "--out", str(out),
                 "--no-progress"]) == 2
    assert "dmos_realigned.mat: missing" in caplog.text
    assert main(["pack", "csiq", str(live_both), "--live-dmos", "realigned", "--out", str(out),
                 "--no-progress"]) == 2
    assert "--live-dmos applies to the live format only, not csiq" in caplog.text
    assert main(["pack", "live", str(live_both), "--lists", str(tmp_path / "l.txt"), "--live-dmos", "original",
                 "--out", str(out), "--no-progress"]) == 2
    assert "--live-dmos cannot be used with --lists" in caplog.text
    assert not out.exists()  # refused before anything was written


KONIQ_HEADER = '"image_name","c1","c2","c3","c4","c5","c_total","MOS","SD","MOS_zscore"\n'


def make_koniq(root: Path, rows: list[tuple[str, str, str]], zscore: bool = True) -> Path:
    """A KonIQ-10k folder: ``rows`` of (image name, MOS, MOS_zscore) in the released CSV layout."""
    (root / "1024x768").mkdir(parents=True)
    lines = [KONIQ_HEADER if zscore else KONIQ_HEADER.replace(',"MOS_zscore"', "")]
    for i, (name, mos, z) in enumerate(rows):
        photo(256, 192, seed=i).save(root / "1024x768" / name)
        lines.append(f'"{name}",0,1,23,73,3,100,{mos},0.5' + (f",{z}" if zscore else "") + "\n")
    (root / "koniq10k_scores_and_distributions.csv").write_text("".join(lines))
    return root


def test_koniq_mos_zscore_goes_to_extra(tmp_path):
    root = make_koniq(tmp_path / "koniq10k", [("1.jpg", "3.78", "72.4"), ("2.jpg", "1.5", "12.25")])
    recs = {r.key: r for r in read_dataset("koniq10k", root)}
    assert recs["koniq10k_1"].mos == 3.78 and recs["koniq10k_1"].extra == {"mos_zscore": 72.4}
    assert recs["koniq10k_2"].mos == 1.5 and recs["koniq10k_2"].extra == {"mos_zscore": 12.25}


def test_koniq_without_mos_zscore_has_no_extra(tmp_path):
    root = make_koniq(tmp_path / "koniq10k", [("1.jpg", "3.78", "")], zscore=False)
    [r] = read_dataset("koniq10k", root)
    assert r.mos == 3.78 and r.extra == {}


@pytest.mark.parametrize("value,message", [("abc", r"csv:3: 'abc' is not a number"),
                                           ("", r"csv:3: empty mos_zscore cell"),
                                           ("nan", r"csv:3: MOS_zscore 'nan' is not a finite number")])
def test_koniq_malformed_mos_zscore_names_file_and_line(tmp_path, value, message):
    root = make_koniq(tmp_path / "koniq10k", [("1.jpg", "3.78", "72.4"), ("2.jpg", "1.5", value)])
    with pytest.raises(DatasetFormatError, match=r"koniq10k_scores_and_distributions\." + message):
        read_dataset("koniq10k", root)


def test_manifest_extra_ranges_over_the_packed_records(tmp_path):
    root = make_koniq(tmp_path / "koniq10k", [("1.jpg", "3.78", "72.4"), ("2.jpg", "1.5", "12.25"),
                                              ("3.jpg", "2.0", "40.5"), ("4.jpg", "4.9", "99.9")])
    (root / "1024x768" / "4.jpg").write_bytes(b"not an image")  # rejected: its 99.9 is not in the range
    out = tmp_path / "shards" / "koniq10k"
    result = pack_records(read_dataset("koniq10k", root), out, "koniq10k", {}, PackConfig(workers=1),
                          progress=False)
    assert (result.samples, result.rejected) == (3, 1)
    manifest = read_manifest(out)
    assert manifest["extra_ranges"] == {"mos_zscore": [12.25, 72.4]}
    assert manifest["mos_range"] == [1.5, 3.78]
    labels = shard_labels(out)
    assert {k: v["extra"] for k, v in labels.items()} == {"koniq10k_1": {"mos_zscore": 72.4},
                                                          "koniq10k_2": {"mos_zscore": 12.25},
                                                          "koniq10k_3": {"mos_zscore": 40.5}}


def test_extra_ranges_take_numbers_only():
    def rec(i: int, extra: dict) -> Record:
        return Record(key=f"k{i}", dataset="d", mos=1.0, source=f"s{i}", data=b"", ext="png", extra=extra)

    recs = [rec(0, {"z": 3.5, "n": 4, "flag": True, "kind": "10_03", "bad": float("nan")}),
            rec(1, {"z": -1.0, "bad": float("inf")}),
            rec(2, {}),
            rec(3, {"n": 2, "z": 8, "only": 0.5})]
    assert extra_ranges(recs) == {"n": [2, 4], "only": [0.5, 0.5], "z": [-1.0, 8]}
    assert extra_ranges([rec(0, {"pipal_type": "00_00"})]) == {}


def test_verify_counts_the_left_out_entries_as_part_of_a_complete_set(live_both, tmp_path, monkeypatch):
    """A realigned LIVE pack holds fewer images than the catalog's count by the entries left
    out on purpose: ``shards verify`` counts them, and warns only for images really missing."""
    from liqe_dist.data import catalog
    from liqe_dist.data.verify import verify_shards

    out = tmp_path / "shards" / "live"
    pack_records(read_dataset("live", live_both, options={"dmos": "realigned"}), out, "live", {"format": "live"},
                 PackConfig(workers=1), progress=False)  # 3 packed, 2 left out
    real = catalog.load_catalog()
    for images, warned in ((5, False), (6, True)):
        entry = dataclasses.replace(real["live"], images=images)
        monkeypatch.setattr(catalog, "load_catalog", lambda entry=entry: {**real, "live": entry})
        assert bool(verify_shards(out, progress=False).warnings) is warned, images
