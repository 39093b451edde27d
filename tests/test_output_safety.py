"""A command replaces only what it wrote: packing never deletes its inputs or a user's folder,
set names are plain, keys never hold a dot, and every other writer keeps to its own folder."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from liqe_dist.cli import main
from liqe_dist.data.corpus import CorpusConfig, pack_corpus, walk_images
from liqe_dist.data.packing import PackConfig, PackingError, ShardSink, read_manifest
from liqe_dist.data.stream import iter_shard
from liqe_dist.outputs import OutputError, claim_dir, plain_name

CLI = [sys.executable, "-m", "liqe_dist.cli"]


def tree(root: Path) -> dict[str, str]:
    """Every file under ``root`` (hidden ones too) -> the SHA-256 of its bytes."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def photos(folder: Path, n: int = 3, seed: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(folder / f"p{i}.png")
    return folder


def koniq(root: Path, n: int = 4) -> Path:
    """A KonIQ-10k folder in its distribution's layout (images + the MOS table)."""
    photos(root / "1024x768", n)
    rows = "".join(f'"p{i}.png",0,1,23,73,3,100,{3 + i / 10},0.5,{50 + i}\n' for i in range(n))
    (root / "koniq10k_scores_and_distributions.csv").write_text(
        '"image_name","c1","c2","c3","c4","c5","c_total","MOS","SD","MOS_zscore"\n' + rows)
    return root


def run_cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(CLI + args, cwd=cwd, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1])))


# -- the cases that destroyed data, through the real command -----------------------------------

@pytest.mark.slow
def test_pack_folder_into_its_own_parent_keeps_the_photos(tmp_path):
    photos(tmp_path / "photos")
    before = tree(tmp_path)
    proc = run_cli(["pack", "folder", "photos", "--out", ".", "--workers", "1", "--no-progress"], tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "holds the input photos" in proc.stderr and "Traceback" not in proc.stderr
    assert tree(tmp_path) == before


@pytest.mark.slow
def test_pack_a_dataset_into_its_parent_keeps_the_dataset(tmp_path):
    koniq(tmp_path / "data" / "koniq10k")
    before = tree(tmp_path)
    proc = run_cli(["pack", "koniq10k", "data/koniq10k", "--out", "data", "--no-progress"], tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "holds the input" in proc.stderr
    assert tree(tmp_path) == before


@pytest.mark.slow
def test_pack_dot_names_the_set_after_the_folder_and_keeps_the_others(tmp_path):
    photos(tmp_path / "imgs")
    assert main(["pack", "folder", str(photos(tmp_path / "other", seed=1)), "--out", str(tmp_path / "shards"),
                 "--workers", "1", "--no-progress"]) == 0
    other = tree(tmp_path / "shards" / "other")
    proc = run_cli(["pack", "folder", ".", "--out", "../shards", "--workers", "1", "--no-progress"], tmp_path / "imgs")
    assert proc.returncode == 0, proc.stderr
    assert tree(tmp_path / "shards" / "other") == other
    assert read_manifest(tmp_path / "shards" / "imgs")["samples"] == 3


# -- the same rule, in process ------------------------------------------------------------------

def test_an_unrelated_folder_at_the_set_path_is_left_alone(tmp_path):
    photos(tmp_path / "photos")
    (tmp_path / "out" / "photos").mkdir(parents=True)
    (tmp_path / "out" / "photos" / "thesis.tex").write_text("\\section{Results}")
    before = tree(tmp_path)
    assert main(["pack", "folder", str(tmp_path / "photos"), "--out", str(tmp_path / "out"), "--workers", "1",
                 "--no-progress"]) == 2
    assert tree(tmp_path) == before


def test_labelled_pack_refuses_a_set_folder_that_holds_its_images(tmp_path):
    """csv format: the table's images live in the folder the set would replace."""
    root = photos(tmp_path / "mine" / "x")
    (tmp_path / "mine" / "labels.csv").write_text("path,mos\n" + "".join(f"x/p{i}.png,{i}\n" for i in range(3)))
    before = tree(tmp_path)
    assert root.exists()
    assert main(["pack", "csv", str(tmp_path / "mine" / "labels.csv"), "--name", "x", "--out",
                 str(tmp_path / "mine"), "--no-progress"]) == 2
    assert tree(tmp_path) == before


def test_an_empty_folder_or_an_earlier_set_is_replaced(tmp_path):
    src = photos(tmp_path / "photos")
    (tmp_path / "shards" / "photos").mkdir(parents=True)  # made by the user beforehand, empty
    args = ["pack", "folder", str(src), "--out", str(tmp_path / "shards"), "--workers", "1", "--no-progress"]
    assert main(args) == 0
    assert main(args + ["--force"]) == 0  # an earlier set: replaced
    assert read_manifest(tmp_path / "shards" / "photos")["samples"] == 3
    assert not (tmp_path / "shards" / ".photos.lock").exists()  # the lock goes with the pack
    assert sorted(p.name for p in (tmp_path / "shards").iterdir()) == ["photos"]


def test_a_building_folder_without_the_mark_is_not_deleted(tmp_path):
    src = photos(tmp_path / "photos")
    odd = tmp_path / "shards" / ".photos.building"
    odd.mkdir(parents=True)
    (odd / "keep.txt").write_text("mine")
    assert main(["pack", "folder", str(src), "--out", str(tmp_path / "shards"), "--workers", "1",
                 "--no-progress"]) == 2
    assert (odd / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize("name", ["../victim", "a/b", "", ".", "..", "x\ny", "x\0y", "x" * 300])
def test_set_names_are_plain(tmp_path, name):
    src = photos(tmp_path / "photos")
    (tmp_path / "victim").mkdir()
    (tmp_path / "victim" / "f").write_text("x")
    assert main(["pack", "folder", str(src), "--out", str(tmp_path / "shards"), "--name", name, "--workers", "1",
                 "--no-progress"]) == 2
    assert main(["pack", "csv", str(tmp_path / "t.csv"), "--out", str(tmp_path / "shards"), "--name", name]) == 2
    assert (tmp_path / "victim" / "f").read_text() == "x" and not (tmp_path / "shards").exists()


def test_plain_name_accepts_ordinary_names():
    for name in ("photos", "photos.2024", "v1.0", "café", "KonIQ-10k_train"):
        assert plain_name(name) == name
    with pytest.raises(OutputError, match="plain name"):
        plain_name("a\\b")


# -- keys and read-back -------------------------------------------------------------------------

@pytest.mark.parametrize("source", ["photos.2024", "list.txt", "glob"])
def test_a_dot_in_the_set_name_leaves_every_shard_readable(tmp_path, source):
    src = photos(tmp_path / "photos.2024", n=4)
    (tmp_path / "list.txt").write_text("".join(f"photos.2024/p{i}.png\n" for i in range(4)))
    root = {"photos.2024": str(src), "list.txt": str(tmp_path / "list.txt"),
            "glob": str(tmp_path / "photos.2024" / "*.png")}[source]
    assert main(["pack", "folder", root, "--out", str(tmp_path / "shards"), "--workers", "1", "--no-progress"]) == 0
    [set_dir] = [p for p in (tmp_path / "shards").iterdir()]
    assert set_dir.name == {"photos.2024": "photos.2024", "list.txt": "list", "glob": "photos.2024"}[source]
    samples = [s for shard in sorted(set_dir.glob("*.tar")) for s in iter_shard(shard)]
    assert len(samples) == 4 and all("." not in s.key and "png" in s.fields for s in samples)


def test_labelled_set_names_with_dots_read_back(tmp_path):
    photos(tmp_path / "mine")
    (tmp_path / "mine" / "labels.csv").write_text("path,mos\n" + "".join(f"p{i}.png,{i}\n" for i in range(3)))
    assert main(["pack", "csv", str(tmp_path / "mine" / "labels.csv"), "--name", "v1.0", "--out",
                 str(tmp_path / "shards"), "--no-progress", "--splits", "1"]) == 0
    samples = [s for shard in (tmp_path / "shards" / "v1.0").glob("*.tar") for s in iter_shard(shard)]
    assert len(samples) == 3 and {s.key for s in samples} == {"v1_0_p0", "v1_0_p1", "v1_0_p2"}


def test_a_shard_that_does_not_read_back_fails_the_pack(tmp_path):
    """Two samples under one key: WebDataset cannot group them, so the shard is refused."""
    sink = ShardSink(tmp_path, "s", PackConfig())
    sink.write("a", "png", b"1", b"{}")
    sink.write("a", "png", b"2", b"{}")
    with pytest.raises(PackingError, match="cannot read the shard|reads 1"):
        sink.finish()
    with pytest.raises(ValueError, match="no dot"):
        ShardSink(tmp_path, "s", PackConfig()).write("a.b", "png", b"1", b"{}")


# -- resuming a corpus whose folder changed -----------------------------------------------------

def _killed_pack(src: Path, out: Path, stop_after: int) -> None:
    """A pack of ``src`` killed (an exception from the listing) after ``stop_after`` entries,
    leaving its building folder as SIGKILL would after the last closed shard."""
    from liqe_dist.data import corpus

    real = corpus.list_corpus

    def dying(source):
        for i, entry in enumerate(real(source)):
            if i == stop_after:
                raise KeyboardInterrupt
            yield entry
    corpus.list_corpus = dying
    try:
        with pytest.raises(KeyboardInterrupt):
            pack_corpus(src, out, "c", CorpusConfig(shard_max_count=3, workers=1), progress=False)
    finally:
        corpus.list_corpus = real


def _keys(set_dir: Path) -> list[str]:
    return [s.fields["json"].decode() for shard in sorted(set_dir.glob("*.tar")) for s in iter_shard(shard)]


@pytest.mark.parametrize("change", ["deleted", "added early", "rewritten"])
def test_a_resumed_pack_of_a_changed_folder_starts_over(tmp_path, change):
    src = photos(tmp_path / "photos", n=10)
    out = tmp_path / "shards" / "c"
    _killed_pack(src, out, 8)
    assert len(list((out.parent / ".c.building").glob("c-*.tar"))) == 2
    if change == "deleted":
        (src / "p1.png").unlink()
    elif change == "added early":
        Image.new("RGB", (40, 40), "red").save(src / "a_new.png")
    else:
        Image.new("RGB", (40, 40), "blue").save(src / "p2.png")
    resumed = pack_corpus(src, out, "c", CorpusConfig(shard_max_count=3, workers=1), progress=False)
    fresh = pack_corpus(src, tmp_path / "fresh" / "c", "c", CorpusConfig(shard_max_count=3, workers=1),
                        progress=False)
    assert resumed.restarted and resumed.resumed_at == 0 and "started over" in resumed.summary("c")
    assert _keys(out) == _keys(tmp_path / "fresh" / "c") and resumed.samples == fresh.samples


def test_an_unchanged_folder_still_resumes(tmp_path):
    src = photos(tmp_path / "photos", n=10)
    out = tmp_path / "shards" / "c"
    _killed_pack(src, out, 8)
    resumed = pack_corpus(src, out, "c", CorpusConfig(shard_max_count=3, workers=1), progress=False)
    assert resumed.resumed_at == 6 and not resumed.restarted and resumed.samples == 10


# -- listings -----------------------------------------------------------------------------------

def test_a_very_deep_tree_is_walked(tmp_path):
    deep = str(tmp_path)
    for _ in range(1100):  # one level at a time: pathlib's mkdir(parents=True) recurses too
        deep += "/d"
        os.mkdir(deep)
    photos(Path(deep), n=1)
    Image.new("RGB", (30, 30)).save(tmp_path / "top.png")
    try:
        found = list(walk_images(tmp_path))
        assert [p.name for p in found] == ["p0.png", "top.png"]
    finally:  # bottom up: shutil.rmtree (pytest's clean-up) recurses and would fail on it
        os.remove(os.path.join(deep, "p0.png"))
        while deep != str(tmp_path):
            os.rmdir(deep)
            deep = os.path.dirname(deep)


def test_control_characters_in_file_names_keep_the_side_files_one_row_per_file(tmp_path):
    src = photos(tmp_path / "photos", n=2)
    for odd in ("bad\rname.png", "tab\tname.png", "new\nline.png"):
        (src / odd).write_bytes(b"not an image")
    result = pack_corpus(src, tmp_path / "shards" / "c", "c", CorpusConfig(workers=1), progress=False)
    assert result.rejected == 3
    rows = (tmp_path / "shards" / "c" / "rejects.tsv").read_bytes().split(b"\n")
    assert rows[-1] == b"" and len(rows) == 1 + 3 + 1
    assert all(row.count(b"\t") == 2 and b"\r" not in row for row in rows[:-1])
    assert b"bad\\rname.png" in rows[1]


# -- the other writers keep to their folders ----------------------------------------------------

def test_claim_dir_uses_only_new_empty_or_own_folders(tmp_path):
    assert claim_dir(tmp_path / "new", "eval").is_dir()
    assert claim_dir(tmp_path / "new", "eval").is_dir()  # its own folder again
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("x")
    with pytest.raises(OutputError, match="not written by this command"):
        claim_dir(tmp_path / "mine", "eval")
    with pytest.raises(OutputError, match="is the output of `liqe-dist eval`, not of this command"):
        claim_dir(tmp_path / "new", "make-synthetic")
    with pytest.raises(OutputError, match="lies inside the input"):
        claim_dir(tmp_path / "mine" / "out", "eval", inputs=[tmp_path / "mine"])
    assert sorted(os.listdir(tmp_path / "mine")) == ["notes.txt"]


def test_make_synthetic_refuses_a_folder_of_the_users(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "labels.csv").write_text("mine")
    assert main(["make-synthetic", str(tmp_path / "data"), "--references", "1", "--no-progress"]) == 2
    assert (tmp_path / "data" / "labels.csv").read_text() == "mine"
    assert os.listdir(tmp_path / "data") == ["labels.csv"]
