"""Packing an unlabelled corpus: listing, duplicates, rejects, and resuming after SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from liqe_dist.data.corpus import CorpusConfig, list_corpus, pack_corpus
from liqe_dist.data.stream import iter_shard
from liqe_dist.data.verify import verify_shards

IMAGES = 200


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """200 small images in 4 folders, 4 exact duplicates (same pixels, another format), one
    corrupt file early and one late."""
    root = tmp_path_factory.mktemp("corpus") / "photos"
    rng = np.random.default_rng(0)
    for i in range(IMAGES):
        folder = root / f"f{i % 4}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (24 + i % 7, 32, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"img{i:03d}.png")
        if i % 50 == 7:
            Image.fromarray(pixels).save(folder / f"copy{i:03d}.bmp")
    (root / "f0" / "aaa_broken.jpg").write_bytes(b"not a jpeg")
    (root / "f3" / "zzz_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (root / "f1" / "notes.txt").write_text("not an image, not listed")
    return root


def shard_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.tar"))}


def test_walk_is_sorted_and_complete(corpus):
    names = [name for name, _ in list_corpus(corpus)]
    assert names == sorted(names, key=lambda n: n.split("/"))
    assert len(names) == IMAGES + 4 + 2 and "f1/notes.txt" not in names


def test_pack_reports_duplicates_and_rejects(corpus, tmp_path):
    result = pack_corpus(corpus, tmp_path / "c", "c", CorpusConfig(shard_max_count=16, workers=2), progress=False)
    assert (result.samples, result.rejected, result.duplicates, result.dropped) == (IMAGES + 4, 2, 4, 0)
    dups = (tmp_path / "c" / "duplicates.tsv").read_text().splitlines()[1:]
    # listing order is sorted: copyNNN.bmp comes before imgNNN.png of the same folder, and is kept
    assert sorted(d.split("\t")[0] for d in dups) == sorted(f"f{i % 4}/img{i:03d}.png" for i in (7, 57, 107, 157))
    assert all(d.split("\t")[2].startswith("c_f") and "copy" in d.split("\t")[2] for d in dups)
    rejects = (tmp_path / "c" / "rejects.tsv").read_text().splitlines()[1:]
    assert [r.split("\t")[0] for r in rejects] == ["f0/aaa_broken.jpg", "f3/zzz_broken.png"]
    assert verify_shards(tmp_path / "c", progress=False).ok
    sample = next(iter_shard(sorted((tmp_path / "c").glob("*.tar"))[0]))
    labels = json.loads(sample.fields["json"])
    assert set(labels) == {"key", "dataset", "source", "width", "height", "content_hash"}  # no invented labels
    assert labels["source"].startswith("f0/") and len(labels["content_hash"]) == 32

    dropped = pack_corpus(corpus, tmp_path / "d", "d", CorpusConfig(shard_max_count=16, drop_duplicates=True,
                                                                    workers=1), progress=False)
    assert (dropped.samples, dropped.dropped) == (IMAGES, 4)
    again = pack_corpus(corpus, tmp_path / "d", "d", CorpusConfig(shard_max_count=16, drop_duplicates=True,
                                                                  workers=1), progress=False)
    assert again.skipped and again.samples == IMAGES


def test_list_file_and_glob(corpus, tmp_path):
    listing = tmp_path / "list.txt"
    listing.write_text(f"# corpus\n{corpus}/f0/img000.png\n{corpus}/f1/img001.png\n{corpus}/f0/img000.png\n"
                       f"{corpus}/missing.png\n")
    result = pack_corpus(listing, tmp_path / "l", "l", CorpusConfig(workers=1), progress=False)
    # the file listed twice is dropped (it is one image), the missing one rejected
    assert (result.samples, result.rejected, result.dropped, result.duplicates) == (2, 1, 1, 0)
    result = pack_corpus(f"{corpus}/f2/*.png", tmp_path / "g", "g", CorpusConfig(workers=1), progress=False)
    assert result.samples == IMAGES // 4
    with pytest.raises(FileNotFoundError, match="no such folder or list file"):
        pack_corpus(tmp_path / "nothing", tmp_path / "n", "n", CorpusConfig(workers=1), progress=False)


KILLER = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    import liqe_dist.data.corpus as corpus
    real = corpus.inspect_image
    calls = 0
    def inspect_then_die(args):
        global calls
        calls += 1
        if calls == int(sys.argv[3]):
            os.kill(os.getpid(), signal.SIGKILL)
        return real(args)
    corpus.inspect_image = inspect_then_die
    corpus.pack_corpus(sys.argv[1], Path(sys.argv[2]), "c", corpus.CorpusConfig(shard_max_count=16, workers=1),
                       progress=False)
""")


def test_killed_pack_resumes_to_the_same_set(corpus, tmp_path):
    whole = pack_corpus(corpus, tmp_path / "whole" / "c", "c", CorpusConfig(shard_max_count=16, workers=1),
                        progress=False)
    out = tmp_path / "killed" / "c"
    # killed while reading the 123rd file: 7 shards closed, rejects and duplicates written past them
    proc = subprocess.run([sys.executable, "-c", KILLER, str(corpus), str(out), "123"], capture_output=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    building = out.parent / ".c.building"
    assert not out.exists() and len(list(building.glob("*.tar"))) >= 7
    resumed = pack_corpus(corpus, out, "c", CorpusConfig(shard_max_count=16, workers=1), progress=False)
    assert 0 < resumed.resumed_at < 123
    assert shard_bytes(out) == shard_bytes(tmp_path / "whole" / "c")
    for side in ("rejects.tsv", "duplicates.tsv"):
        assert (out / side).read_text() == (tmp_path / "whole" / "c" / side).read_text()
    assert (resumed.samples, resumed.rejected, resumed.duplicates) == (whole.samples, whole.rejected,
                                                                       whole.duplicates)
    assert not building.exists() and not (out / "progress.json").exists()


def test_changed_options_start_over(corpus, tmp_path):
    out = tmp_path / "c"
    proc = subprocess.run([sys.executable, "-c", KILLER, str(corpus), str(out), "60"], capture_output=True)
    assert proc.returncode == -signal.SIGKILL
    result = pack_corpus(corpus, out, "c", CorpusConfig(shard_max_count=50, workers=2), progress=False)
    assert result.resumed_at == 0 and result.samples == IMAGES + 4
    assert len(list(out.glob("*.tar"))) == 5


def test_cli_pack_folder(corpus, tmp_path):
    env = dict(os.environ)
    proc = subprocess.run([sys.executable, "-m", "liqe_dist.cli", "pack", "folder", str(corpus), "--out",
                           str(tmp_path), "--no-progress", "--shard-max-count", "100"],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "packed corpus photos: 204 images in 3 shard(s)" in proc.stderr
    assert "4 duplicate image(s)" in proc.stderr
    manifest = json.loads((tmp_path / "photos" / "manifest.json").read_text())
    assert manifest["kind"] == "corpus" and manifest["samples"] == 204
