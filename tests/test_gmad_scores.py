"""Reading a scores folder for gMAD: every part file's schema is checked, a model without any
finite score and a manifest that is not a JSON object are clear errors naming them, images
without a content hash are never merged, and only the part files the manifest lists are read."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gmad_fixtures import copy_scores, make_scored, with_column
from liqe_dist.cli import main
from liqe_dist.gmad.scores import read_scores
from liqe_dist.gmad.search import GMADError, LevelRule, first_of_each_hash, search


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    return make_scored(tmp_path_factory.mktemp("gmad-scores"))


def parts(root):
    return sorted(p.name for p in (root / "scores").glob("*.parquet"))


def test_every_part_file_schema_is_checked(scored, tmp_path, caplog):
    root, _ = scored
    last = parts(root)[-1]
    lacking = copy_scores(root / "scores", tmp_path / "lacking",
                          lambda name, t: t.drop_columns(["b"]) if name == last else t)
    with pytest.raises(GMADError, match=rf"{last}: no scores for model\(s\) \['b'\]"):
        read_scores(lacking, ["a", "b"])
    assert main(["gmad", "search", str(lacking), "--models", "a", "b", "--out", str(tmp_path / "g")]) == 2
    assert f"{last}: no scores for model(s) ['b']" in caplog.text and not (tmp_path / "g").exists()
    no_source = copy_scores(root / "scores", tmp_path / "no_source",
                            lambda name, t: t.drop_columns(["source"]) if name == last else t)
    with pytest.raises(GMADError, match=rf"{last}: no column 'source'"):
        read_scores(no_source, ["a", "b"])
    text = copy_scores(root / "scores", tmp_path / "text",
                       lambda name, t: with_column(t, "b", [str(v) for v in t["b"].to_pylist()]) if name == last else t)
    with pytest.raises(GMADError, match=rf"{last}: model 'b'.s column holds string, not numbers"):
        read_scores(text, ["a", "b"])


def test_a_model_without_finite_scores_is_named(scored, tmp_path, caplog):
    root, _ = scored
    nan = copy_scores(root / "scores", tmp_path / "nan",
                      lambda name, t: with_column(t, "broken", [float("nan")] * t.num_rows))
    with pytest.raises(GMADError, match=r"model\(s\) \['broken'\] have no finite score on any image"):
        read_scores(nan, ["a", "broken"])
    assert main(["gmad", "search", str(nan), "--models", "broken", "a", "--out", str(tmp_path / "g")]) == 2
    assert "['broken'] have no finite score" in caplog.text


@pytest.mark.parametrize("manifest,message", [([], "a JSON list, expected an object"),
                                              ({"inputs": "shards"}, "'inputs' must be a list of paths")])
def test_a_manifest_that_is_not_an_object_is_named(scored, tmp_path, caplog, manifest, message):
    root, _ = scored
    bad = copy_scores(root / "scores", tmp_path / "bad", manifest=lambda m: manifest)
    with pytest.raises(GMADError, match=message):
        read_scores(bad, ["a", "b"])
    assert main(["gmad", "search", str(bad), "--models", "a", "b", "--out", str(tmp_path / "g")]) == 2
    assert f"{bad / 'manifest.json'}: " in caplog.text and message in caplog.text
    (bad / "manifest.json").write_text("{not json")
    with pytest.raises(GMADError, match=r"manifest.json: unreadable manifest"):
        read_scores(bad, ["a", "b"])


def test_images_without_a_content_hash_are_never_merged(scored, tmp_path):
    """Null hashes in half the part files, empty ones in the others (the two copies of p05
    among them): every image counts on its own, as if there were no hashes at all."""
    root, _ = scored
    names = parts(root)

    def unhash(name, table):
        values = [None] * table.num_rows if names.index(name) % 2 else [""] * table.num_rows
        return with_column(table, "content_hash", pa.array(values, pa.string()))

    corpus = read_scores(copy_scores(root / "scores", tmp_path / "s", unhash), ["a", "b", "c"])
    assert first_of_each_hash(corpus.hashes).all()
    rule = LevelRule(levels=4)
    got = search(corpus.scores, ["a", "b", "c"], rule, corpus.hashes)
    assert got.pairs == search(corpus.scores, ["a", "b", "c"], rule).pairs and len(got.pairs) > 6
    # with the real hashes, the two copies of p05 count once
    real = read_scores(root / "scores", ["a", "b", "c"])
    assert (~first_of_each_hash(real.hashes)).sum() == 1


def test_only_the_part_files_the_manifest_lists_are_read(scored, tmp_path, caplog):
    root, _ = scored
    names = parts(root)
    listed = copy_scores(root / "scores", tmp_path / "s",
                         manifest=lambda m: {**m, "parts": {n: {} for n in names[:-1]}})
    caplog.set_level("WARNING")
    corpus = read_scores(listed, ["a", "b"])
    everything = read_scores(root / "scores", ["a", "b"])
    left_out = set(pq.read_table(root / "scores" / names[-1]).column("key").to_pylist())
    assert set(corpus.keys) == set(everything.keys) - left_out and left_out
    assert f"1 part file(s) the manifest does not list are left out ({names[-1]})" in caplog.text
