import json
import tarfile

import pytest

from conftest import jpeg_bytes, photo
from shard_fixtures import pack_csv, write_csv_dataset
from liqe_dist.cli import main
from liqe_dist.data.adapters import read_dataset
from liqe_dist.data.packing import PackConfig, pack_records, read_manifest
from liqe_dist.data.records import Record
from liqe_dist.data.splits import assign_splits, in_part
from liqe_dist.data.stream import iter_shard
from liqe_dist.data.verify import shards_info, verify_shards


def test_round_trip_bytes_and_labels(tmp_path):
    table = write_csv_dataset(tmp_path / "raw")
    shard_dir = pack_csv(table, tmp_path / "shards", shard_max_count=7)
    manifest = read_manifest(shard_dir)
    assert manifest["samples"] == 24 and len(manifest["shards"]) == 4  # 7+7+7+3
    records = {r.key: r for r in read_dataset("csv", table, "toy")}
    seen = 0
    for entry in manifest["shards"]:
        for raw in iter_shard(shard_dir / entry["name"]):
            rec = records[raw.key]
            labels = json.loads(raw.fields["json"])
            [ext] = [k for k in raw.fields if k != "json"]
            assert ext == rec.ext
            assert raw.fields[ext] == open(rec.path, "rb").read()  # original bytes, not re-encoded
            assert labels["mos"] == rec.mos and labels["scenes"] == list(rec.scenes)
            assert labels["distortion"] == rec.distortion and labels["reference"] == rec.reference
            assert (labels["width"], labels["height"]) == (256, 240) and len(labels["splits"]) == 10
            seen += 1
    assert seen == 24
    assert manifest["labels"] == {"mos": 24, "mos_std": 0, "scenes": 24, "distortion": 24, "reference": 24}
    for name in (e["name"] for e in manifest["shards"]):
        with tarfile.open(shard_dir / name) as t:
            assert all("." not in m.name.split(".")[0] for m in t.getmembers())


def test_size_limit_closes_shards(tmp_path):
    table = write_csv_dataset(tmp_path / "raw", n_refs=3, per_ref=2)
    shard_dir = pack_csv(table, tmp_path / "shards", shard_max_bytes=300_000)
    sizes = [s["bytes"] for s in read_manifest(shard_dir)["shards"]]
    assert len(sizes) > 1 and max(sizes) <= 300_000 + 200_000  # one image may overflow an empty shard


def test_broken_files_are_rejected_and_reported(tmp_path):
    full = jpeg_bytes(photo(300, 300, 9))
    broken = [("bad/empty.jpg", b""), ("bad/garbage.png", b"not an image"),
              ("bad/truncated.jpg", full[: len(full) // 3]), ("bad/missing.png", None)]
    table = write_csv_dataset(tmp_path / "raw", n_refs=3, per_ref=2, extra_rows=broken)
    bomb = tmp_path / "raw" / "bad" / "bomb.png"
    photo(1000, 1000).save(bomb)
    with open(table, "a") as f:
        f.write("bad/bomb.png,1.0,blur,animal,refY\n")
    recs = read_dataset("csv", table, "toy")
    result = pack_records(recs, tmp_path / "shards" / "toy", "toy", {}, PackConfig(workers=2, max_pixels=900_000),
                          progress=False)
    assert result.samples == 6 and result.rejected == 5
    rejects = (tmp_path / "shards" / "toy" / "rejects.tsv").read_text().splitlines()
    assert rejects[0] == "source\tpath\treason"
    reasons = {line.split("\t")[1].rsplit("/", 1)[-1]: line.split("\t")[2] for line in rejects[1:]}
    assert "empty file" in reasons["empty.jpg"] and "not a recognised image" in reasons["garbage.png"]
    assert "truncated" in reasons["truncated.jpg"] and "file not found" in reasons["missing.png"]
    assert "too large" in reasons["bomb.png"]
    assert all("labels.csv:" in line.split("\t")[0] for line in rejects[1:])
    assert read_manifest(tmp_path / "shards" / "toy")["rejected"] == 5
    assert verify_shards(tmp_path / "shards" / "toy", progress=False).ok


def test_the_same_file_twice_names_both_sources(tmp_path):
    photo(240, 240).save(tmp_path / "x.png")
    a = Record(key="d_x", dataset="d", mos=1.0, source="first.csv:2", path=str(tmp_path / "x.png"))
    b = Record(key="d_x", dataset="d", mos=2.0, source="second.csv:9", path=str(tmp_path / "x.png"))
    with pytest.raises(ValueError, match=r"duplicate entry .*x\.png.*: first\.csv:2 and second\.csv:9"):
        pack_records([a, b], tmp_path / "d", "d", {}, progress=False)


def test_distinct_files_get_distinct_keys(tmp_path):
    """Names that differ only in extension or in characters a key cannot hold share a readable
    key; every file is still packed, under its own key."""
    names = ["a.png", "a.jpg", "café.png", "caf_.png", "cafe.png"]
    for i, name in enumerate(names):
        photo(240, 240, i).save(tmp_path / name, format="PNG" if name.endswith("png") else "JPEG")
    (tmp_path / "labels.csv").write_text("path,mos\n" + "".join(f"{n},{i}\n" for i, n in enumerate(names)),
                                         encoding="utf-8")
    recs = read_dataset("csv", tmp_path / "labels.csv", "d")
    result = pack_records(recs, tmp_path / "shards", "d", {}, PackConfig(workers=1), progress=False)
    assert result.samples == 5 and result.rejected == 0
    keys = sorted(r.key for r in recs)
    assert len(set(keys)) == 5 and "d_cafe" in keys  # an unambiguous name keeps its readable key
    assert sum(k.startswith("d_a_") for k in keys) == 2 and sum(k.startswith("d_caf_") for k in keys) == 2
    assert verify_shards(tmp_path / "shards", progress=False).ok


def test_rerun_skips_when_unchanged_and_rebuilds_cleanly(tmp_path):
    table = write_csv_dataset(tmp_path / "raw", n_refs=3, per_ref=2)
    recs = read_dataset("csv", table, "toy")
    out = tmp_path / "shards" / "toy"
    first = pack_records(recs, out, "toy", {}, PackConfig(workers=1, shard_max_count=4), progress=False)
    again = pack_records(read_dataset("csv", table, "toy"), out, "toy", {}, PackConfig(workers=1, shard_max_count=4),
                         progress=False)
    assert again.skipped and not first.skipped
    # an interrupted earlier run left a partial shard; labels changed since
    (out / "toy-000009.tar.partial").write_bytes(b"half a shard")
    recs = read_dataset("csv", table, "toy")
    recs[0].mos = 99.0
    rebuilt = pack_records(recs, out, "toy", {}, PackConfig(workers=1, shard_max_count=4), progress=False)
    assert not rebuilt.skipped and not list(out.glob("*.partial"))
    assert sorted(p.name for p in out.glob("*.tar")) == ["toy-000000.tar", "toy-000001.tar"]
    assert verify_shards(out, progress=False).ok


def test_verify_detects_damage(tmp_path):
    shard_dir = pack_csv(write_csv_dataset(tmp_path / "raw", n_refs=2, per_ref=3), tmp_path / "shards",
                         shard_max_count=3)
    assert verify_shards(shard_dir, progress=False).ok
    first = shard_dir / "toy-000000.tar"
    data = bytearray(first.read_bytes())
    data[1000] ^= 0xFF
    first.write_bytes(bytes(data))
    (shard_dir / "toy-000001.tar").unlink()
    report = verify_shards(shard_dir, progress=False)
    assert any("toy-000000.tar: sha256 differs" in p for p in report.problems)
    assert any("toy-000001.tar: missing" in p for p in report.problems)


def test_splits_disjoint_by_reference_and_seeded(tmp_path):
    def records(n_refs=20, per=5, refs=True):
        return [Record(key=f"d_{r}_{k}", dataset="d", mos=1.0, source="s", data=b"", ext="png",
                       reference=f"r{r}" if refs else None) for r in range(n_refs) for k in range(per)]
    recs = records()
    info = assign_splits(recs, count=10, seed=3)
    assert info["by"] == "reference" and info["count"] == 10
    for i in range(10):
        parts = {}
        for r in recs:
            parts.setdefault(r.reference, set()).add(r.splits[i])
        assert all(len(p) == 1 for p in parts.values())  # no reference in two parts
        assert info["counts"][i] == {"train": 70, "val": 10, "test": 20}
    again = records()
    assign_splits(again, count=10, seed=3)
    assert [r.splits for r in again] == [r.splits for r in recs]
    other = records()
    assign_splits(other, count=10, seed=4)
    assert [r.splits for r in other] != [r.splits for r in recs]
    assert len({r.splits for r in recs}) > 5  # references land in different parts across splits
    by_image = records(n_refs=10, per=10, refs=False)
    assert assign_splits(by_image, count=2)["by"] == "image"
    assert in_part("tve", 1, "val") and not in_part("tve", 1, "test")


def test_cli_pack_verify_info(tmp_path, capsys):
    table = write_csv_dataset(tmp_path / "raw", n_refs=3, per_ref=2)
    out = tmp_path / "shards"
    assert main(["pack", "csv", str(table), "--name", "mine", "--out", str(out), "--no-progress", "--workers", "1"]) == 0
    assert main(["shards", "verify", str(out / "mine"), "--no-progress"]) == 0
    assert main(["shards", "info", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "mine" in printed and "10 by reference" in printed
    rows = shards_info(out)
    assert rows[0]["samples"] == 6
    assert main(["pack", "csv", str(tmp_path / "nope.csv"), "--out", str(out), "--no-progress"]) == 2


def test_verify_warns_when_a_catalog_dataset_is_incomplete(tmp_path, caplog):
    """A set named like a catalog entry (here ``live``, 779 images) with 6 images is intact but
    incomplete: a warning, not a problem; ``shards verify`` logs it and still passes."""
    from liqe_dist.cli import main
    from liqe_dist.data.catalog import count_warning, load_catalog

    catalog = load_catalog()
    assert {n: e.images for n, e in catalog.items() if n in ("live", "csiq", "kadid10k", "bid", "clive", "koniq10k")} \
        == {"live": 779, "csiq": 866, "kadid10k": 10125, "bid": 586, "clive": 1162, "koniq10k": 10073}
    live = pack_csv(write_csv_dataset(tmp_path / "raw", n_refs=2, per_ref=3), tmp_path / "shards", "live")
    report = verify_shards(live, progress=False)
    assert report.ok and report.warnings == [count_warning("live", 6)]
    assert "live: 6 images packed, a complete LIVE" in report.warnings[0] and "has 779" in report.warnings[0]
    assert count_warning("live", 779) is None and count_warning("mine", 6) is None
    with caplog.at_level("WARNING"):
        assert main(["shards", "verify", str(live), "--no-progress"]) == 0
    assert "has 779" in caplog.text


def test_verify_names_duplicate_keys(tmp_path):
    """A shard set whose shards hold a key twice (in one shard, and across two), with a manifest
    that otherwise matches: `shards verify` names each shard and key, and exits 1."""
    import hashlib
    import io

    shard_dir = pack_csv(write_csv_dataset(tmp_path / "raw", n_refs=2, per_ref=3), tmp_path / "shards",
                         shard_max_count=3)
    first, second = shard_dir / "toy-000000.tar", shard_dir / "toy-000001.tar"
    with tarfile.open(first) as t:
        members = [(m, t.extractfile(m).read()) for m in t.getmembers()]
    key = members[0][0].name.split(".")[0]
    sample = [(m, data) for m, data in members if m.name.split(".")[0] == key]

    def append(path, extra):
        with tarfile.open(path) as t:
            kept = [(m, t.extractfile(m).read()) for m in t.getmembers()]
        with tarfile.open(path, "w") as t:
            for m, data in kept + extra:
                t.addfile(m, io.BytesIO(data))

    append(first, sample)    # the first sample again at the end of its own shard
    append(second, sample)   # and once more in the next shard
    manifest = json.loads((shard_dir / "manifest.json").read_text())
    for entry in manifest["shards"]:
        data = (shard_dir / entry["name"]).read_bytes()
        entry.update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest(), samples=entry["samples"] + 1)
    manifest["samples"] += 2
    (shard_dir / "manifest.json").write_text(json.dumps(manifest))
    problems = verify_shards(shard_dir, progress=False).problems
    assert problems == [f"{first}:{key}: duplicate key {key!r}: a second sample with it in the same shard",
                        f"{second}:{key}: duplicate key {key!r}: a second sample with it (the first is in "
                        f"toy-000000.tar)"]
    assert main(["shards", "verify", str(shard_dir), "--no-progress"]) == 1
