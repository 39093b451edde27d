"""Scoring shards with several models: exactly-once results, equal to `liqe-dist score`, resumable
after a killed job, and a killed Ray worker's shard scored by another worker."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import webdataset as wds
from PIL import Image

from conftest import ACROSS_THREADS
from liqe_dist.cli import main
from liqe_dist.data.corpus import CorpusConfig, pack_corpus
from liqe_dist.eval.score_shards import ModelSpec, ScoreShardsError, score_shards
from liqe_dist.eval.scoring import Scorer
from liqe_dist.models.liqe.config import LIQEConfig
from liqe_dist.models.pmt_iqa.config import PMTIQAConfig
from liqe_dist.models.registry import build_model, load_model
from liqe_dist.models.weights import save_weights

IMAGES = 24


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A corpus of 24 images packed 2 per shard (12 shards), and two tiny models of the two
    families saved as weight files."""
    root = tmp_path_factory.mktemp("score")
    rng = np.random.default_rng(1)
    for i in range(IMAGES):
        (root / "photos").mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (230 + 3 * i, 240, 3), dtype=np.uint8)).save(
            root / "photos" / f"p{i:02d}.png")
    pack_corpus(root / "photos", root / "shards" / "photos", "photos", CorpusConfig(shard_max_count=2, workers=1),
                progress=False)
    torch.manual_seed(0)
    save_weights(build_model(LIQEConfig(name="liqe-tiny")), root / "liqe.safetensors")
    save_weights(build_model(PMTIQAConfig(width=8)), root / "pmt.safetensors")
    models = [ModelSpec("liqe", str(root / "liqe.safetensors")), ModelSpec("pmt", str(root / "pmt.safetensors"))]
    return root, models


def union(out: Path):
    import pandas as pd

    return pd.concat([pq.read_table(p).to_pandas() for p in sorted(out.glob("*.parquet"))], ignore_index=True)


def direct_scores(setup) -> dict[str, dict[str, float]]:
    """`liqe-dist score`'s scorer on the image files: model -> source name -> quality."""
    root, models = setup
    files = sorted((root / "photos").glob("*.png"))
    out = {}
    for spec in models:
        scores = Scorer(load_model(spec.checkpoint), batch_images=3).score([str(f) for f in files])
        out[spec.name] = {Path(s.source).name: s.quality for s in scores}
        out[spec.name + "_heads"] = {Path(s.source).name: s.heads for s in scores}
    return out


@pytest.mark.slow  # 8-19 s of CLI runs: the full suite runs it
def test_scores_equal_liqe_dist_score_once_per_key(setup, tmp_path):
    root, models = setup
    summary = score_shards([root / "shards" / "photos"], models, tmp_path / "s", precision="fp32", progress=False)
    assert (summary.shards, summary.images, summary.errors, summary.skipped) == (12, IMAGES, 0, 0)
    table = union(tmp_path / "s")
    assert sorted(table["key"]) == sorted(set(table["key"])) and len(table) == IMAGES
    direct = direct_scores(setup)
    for _, row in table.iterrows():
        name = Path(row["source"]).name
        assert row["liqe"] == pytest.approx(direct["liqe"][name], abs=1e-5)
        assert row["pmt"] == pytest.approx(direct["pmt"][name], abs=1e-5)
        assert row["liqe_scene"] == direct["liqe_heads"][name]["scene"][0]
        assert row["pmt_quality_class_prob"] == pytest.approx(direct["pmt_heads"][name]["quality_class"][1], abs=1e-5)
        assert (row["width"], row["height"]) == Image.open(root / "photos" / name).size
        assert len(row["content_hash"]) == 32 and row["error"] == ""
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert manifest["complete"] and {m: e["family"] for m, e in manifest["models"].items()} == {"liqe": "liqe",
                                                                                               "pmt": "pmt_iqa"}
    # decoding in 2 processes beside the models (what GPU workers do): the same rows, in shard order
    parallel = score_shards([root / "shards" / "photos"], models, tmp_path / "p", precision="fp32",
                            decode_workers=2, progress=False)
    assert parallel.images == IMAGES
    for shard in sorted((tmp_path / "s").glob("*.parquet")):
        one, two = pq.read_table(shard).to_pandas(), pq.read_table(tmp_path / "p" / shard.name).to_pandas()
        assert list(two["key"]) == list(one["key"]) == sorted(one["key"])
        assert np.allclose(two[["liqe", "pmt"]], one[["liqe", "pmt"]], atol=1e-6)
    again = score_shards([root / "shards" / "photos"], models, tmp_path / "s", precision="fp32", progress=False)
    assert (again.shards, again.skipped) == (0, 12)
    with pytest.raises(ScoreShardsError, match="other models"):
        score_shards([root / "shards" / "photos"], models[:1], tmp_path / "s", precision="fp32", progress=False)


def test_bad_samples_get_error_rows_and_bad_arguments_clear_errors(setup, tmp_path):
    root, models = setup
    tar = tmp_path / "loose-000000.tar"
    with wds.TarWriter(str(tar)) as w:
        w.write({"__key__": "good", "png": (root / "photos" / "p00.png").read_bytes(), "json": b'{"source": "x"}'})
        w.write({"__key__": "bad", "jpg": b"garbage", "json": b"{}"})
    summary = score_shards([tar], models[:1], tmp_path / "s", precision="fp32", progress=False)
    table = union(tmp_path / "s")
    assert (summary.images, summary.errors) == (2, 1)
    bad = table[table["key"] == "bad"].iloc[0]
    assert "not a recognised image format" in bad["error"] and math.isnan(bad["liqe"])
    with pytest.raises(ScoreShardsError, match="NAME=CHECKPOINT"):
        ModelSpec.parse("liqe.safetensors")
    with pytest.raises(ScoreShardsError, match="no such file"):
        ModelSpec.parse("a=/nonexistent.safetensors")
    with pytest.raises(ScoreShardsError, match="must differ"):
        score_shards([tar], [models[0], models[0]], tmp_path / "t", progress=False)
    with pytest.raises(ScoreShardsError, match="two shards named"):
        score_shards([tar, tar], models[:1], tmp_path / "t", progress=False)


KILL_AFTER_TWO = textwrap.dedent("""
    import os, signal, sys
    import liqe_dist.eval.score_shards as ss
    real = ss.ShardScorer.score_to_file
    calls = 0
    def score_then_die(self, job):
        global calls
        calls += 1
        if calls == 3:  # two shards written, the third in flight
            os.kill(os.getpid(), signal.SIGKILL)
        return real(self, job)
    ss.ShardScorer.score_to_file = score_then_die
    from liqe_dist.cli import main
    sys.exit(main(sys.argv[1:]))
""")


@pytest.mark.slow
def test_killed_job_rerun_scores_only_the_rest(setup, tmp_path):
    root, models = setup
    args = ["score-shards", str(root / "shards" / "photos"), "--out", str(tmp_path / "s"), "--precision", "fp32",
            "--no-progress"] + [a for m in models for a in ("--model", f"{m.name}={m.checkpoint}")]
    proc = subprocess.run([sys.executable, "-c", KILL_AFTER_TWO, *args], capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert len(list((tmp_path / "s").glob("*.parquet"))) == 2
    rerun = subprocess.run([sys.executable, "-m", "liqe_dist.cli", *args], capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert "2 of 12 shards already scored" in rerun.stderr
    table = union(tmp_path / "s")
    assert len(table) == IMAGES and table["key"].is_unique
    assert not list((tmp_path / "s").glob("*.partial"))


@pytest.mark.slow
def test_ray_workers_survive_a_killed_worker(setup, tmp_path):
    """Two Ray workers, each decoding in a process of its own; the test kills one (SIGKILL) once
    the first shard is written: its shard goes to the other worker (or a replacement), and the
    union holds every key once with the in-process values."""
    root, models = setup
    out = tmp_path / "s"
    args = [sys.executable, "-m", "liqe_dist.cli", "score-shards", str(root / "shards" / "photos"), "--out", str(out),
            "--precision", "fp32", "--workers", "2", "--batch-images", "1", "--no-progress",
            "--decode-workers", "1"]  # a decoding process inside each actor, as on GPU workers
    args += [a for m in models for a in ("--model", f"{m.name}={m.checkpoint}")]
    log = tmp_path / "log.txt"
    with open(log, "w") as f:
        proc = subprocess.Popen(args, stderr=f, stdout=f, text=True)
    try:
        deadline = time.time() + 240
        pid = None
        while time.time() < deadline and proc.poll() is None:
            text = log.read_text()
            if pid is None and "worker 1: pid" in text:
                pid = int(text.split("worker 1: pid ")[1].split()[0])
            if pid is not None and list(out.glob("*.parquet")):
                os.kill(pid, signal.SIGKILL)
                break
            time.sleep(0.02)
        assert pid is not None, log.read_text()
        assert proc.wait(timeout=240) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    assert "worker 1 died while scoring" in text and "retrying it on another worker" in text, text
    table = union(out)
    assert len(table) == IMAGES and table["key"].is_unique
    reference = score_shards([root / "shards" / "photos"], models, tmp_path / "local", precision="fp32",
                             progress=False)
    assert reference.images == IMAGES
    local = union(tmp_path / "local").set_index("key")
    for _, row in table.iterrows():
        assert row["liqe"] == pytest.approx(local.loc[row["key"], "liqe"], **ACROSS_THREADS)
        assert row["pmt"] == pytest.approx(local.loc[row["key"], "pmt"], **ACROSS_THREADS)


# -- output folders, model names, part files, duplicate keys, --check --------------------------

def tree(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes: to show a refused command changed nothing."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def cli_args(shards, out, models, *extra) -> list[str]:
    return ["score-shards", *map(str, shards), "--out", str(out), "--precision", "fp32", "--no-progress",
            *[a for m in models for a in ("--model", f"{m.name}={m.checkpoint}")], *extra]


def one_image_tar(root: Path, path: Path, keys=("only",)) -> Path:
    """A bare shard of the fixture's first photo under each of ``keys`` (in that order)."""
    with wds.TarWriter(str(path)) as w:
        for key in keys:
            w.write({"__key__": key, "png": (root / "photos" / "p00.png").read_bytes(), "json": b'{"source": "x"}'})
    return path


def test_out_must_be_a_folder_the_command_owns_apart_from_its_inputs(setup, tmp_path, caplog):
    root, models = setup
    shards = root / "shards" / "photos"
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.txt").write_text("years of work")
    before = tree(mine)
    assert main(cli_args([shards], mine, models[:1])) == 2
    assert "holds files not written" in caplog.text and tree(mine) == before
    caplog.clear()
    assert main(cli_args([shards], shards / "scores", models[:1])) == 2  # inside the input
    assert "lies inside the input" in caplog.text and not (shards / "scores").exists()
    caplog.clear()
    assert main(cli_args([shards], root / "shards", models[:1])) == 2    # holds the input
    assert "holds the input" in caplog.text


def test_a_folder_scored_before_owner_marks_is_taken_and_its_unlisted_parts_rescored(setup, tmp_path):
    """A folder written before marks and part records existed (no mark, no ``parts``) is known by
    its manifest: accepted, and every part file in it is scored again (none is listed)."""
    root, models = setup
    out = tmp_path / "s"
    assert score_shards([root / "shards" / "photos"], models[:1], out, precision="fp32", eval_crops=1,
                        progress=False).shards == 12
    (out / ".liqe-dist-output.json").unlink()
    manifest = json.loads((out / "manifest.json").read_text())
    del manifest["parts"]
    (out / "manifest.json").write_text(json.dumps(manifest))
    again = score_shards([root / "shards" / "photos"], models[:1], out, precision="fp32", eval_crops=1,
                         progress=False)
    assert (again.shards, again.skipped, len(again.rescored)) == (12, 0, 12)
    assert all("does not list it" in r for r in again.rescored)
    assert len(json.loads((out / "manifest.json").read_text())["parts"]) == 12


def test_model_names_and_their_columns_must_not_collide(setup, tmp_path, caplog):
    root, models = setup
    tar = one_image_tar(root, tmp_path / "loose-000000.tar")
    liqe = models[0].checkpoint
    assert main(["score-shards", str(tar), "--out", str(tmp_path / "s"), "--no-progress", "--model", f"liqe={liqe}",
                 "--model", f"liqe_scene={liqe}"]) == 2
    assert "'liqe_scene' and 'liqe' collide" in caplog.text and not (tmp_path / "s").exists()
    with pytest.raises(ScoreShardsError, match="'liqe_scene' and 'liqe' collide"):
        score_shards([tar], [ModelSpec("liqe", liqe), ModelSpec("liqe_scene", liqe)], tmp_path / "s", progress=False)
    with pytest.raises(ScoreShardsError, match="'content'.*'content_hash'"):
        score_shards([tar], [ModelSpec("content", liqe)], tmp_path / "s", progress=False)
    for bad in ("../x", "a/b", "x\\y"):
        with pytest.raises(ScoreShardsError, match="model name"):
            ModelSpec(bad, liqe)
    # names that only look alike are fine: liqe-v2 is not liqe_<head>
    summary = score_shards([tar], [ModelSpec("liqe", liqe), ModelSpec("liqe-v2", liqe)], tmp_path / "ok",
                           precision="fp32", eval_crops=1, progress=False)
    assert summary.images == 1 and {"liqe", "liqe-v2", "liqe_scene", "liqe-v2_scene"} <= set(union(tmp_path / "ok"))


def test_part_files_count_only_as_the_manifest_records_them(setup, tmp_path, caplog):
    """A part file replaced by another shard's, and one for a new input that the manifest does not
    list, are both scored again (logged with why); every key ends up once, with its own scores."""
    root, models = setup
    shards, out = root / "shards" / "photos", tmp_path / "s"
    first = score_shards([shards], models[:1], out, precision="fp32", eval_crops=1, progress=False)
    assert first.shards == 12
    parts = sorted(out.glob("photos-*.parquet"))
    record = json.loads((out / "manifest.json").read_text())["parts"][parts[3].name]
    assert record["rows"] == 2 and len(record["sha256"]) == 64 and record["duplicate_keys"] == 0
    expected = union(out).set_index("key")["liqe"]
    parts[3].write_bytes(parts[4].read_bytes())              # same row count, other keys
    tar = one_image_tar(root, tmp_path / "loose-000000.tar")
    (out / "loose-000000.parquet").write_bytes(parts[5].read_bytes())  # a part no run wrote
    caplog.set_level("WARNING")
    again = score_shards([shards, tar], models[:1], out, precision="fp32", eval_crops=1, progress=False)
    assert (again.shards, again.skipped) == (2, 11)
    assert sorted(Path(r.split(": ")[0]).name for r in again.rescored) == ["loose-000000.parquet", parts[3].name]
    assert "differs from what was written" in caplog.text and "does not list it" in caplog.text
    table = union(out)
    assert table["key"].is_unique and len(table) == IMAGES + 1
    table = table.set_index("key")
    assert np.allclose(table.loc[expected.index, "liqe"], expected, atol=1e-6)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and len(manifest["parts"]) == 13


def test_duplicate_keys_in_a_shard_are_counted_and_reported(setup, tmp_path, caplog):
    root, models = setup
    tar = one_image_tar(root, tmp_path / "dups-000000.tar", keys=("a", "b", "a", "c", "a"))
    caplog.set_level("WARNING")
    assert main(cli_args([tar], tmp_path / "s", models[:1], "--eval-crops", "1")) == 0
    assert "dups-000000.tar: 1 key(s) appear more than once" in caplog.text and "'a' x3" in caplog.text
    assert "1 key(s) appear more than once within a shard" in caplog.text
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert manifest["parts"]["dups-000000.parquet"]["duplicate_keys"] == 1
    assert manifest["runs"][-1]["duplicate_keys"] == 1
    summary = score_shards([tar], models[:1], tmp_path / "t", precision="fp32", eval_crops=1, progress=False)
    assert summary.duplicate_keys == 1 and summary.duplicates == [f"{tar}: key 'a' appears 3 times"]


def test_check_validates_models_inputs_and_out_without_writing(setup, tmp_path, caplog):
    """``score-shards --check`` (what a SLURM job runs before Ray): valid -> 0 and "valid", nothing
    created; each bad part -> 2 with a line naming it, nothing changed."""
    from safetensors.torch import save_file

    root, models = setup
    shards = root / "shards" / "photos"
    liqe, pmt = models[0].checkpoint, models[1].checkpoint
    caplog.set_level("INFO")
    good = ["score-shards", str(shards), "--check", "--out", str(tmp_path / "new")]
    assert main([*good, "--model", f"liqe={liqe}", "--model", f"pmt={pmt}"]) == 0
    assert f"{tmp_path / 'new'}: valid" in caplog.text and "liqe (liqe), pmt (pmt_iqa)" in caplog.text
    assert not (tmp_path / "new").exists()
    torch.save({"w": torch.zeros(2)}, tmp_path / "plain.pt")   # a torch file: its zip directory is read
    assert main([*good, "--model", f"liqe={tmp_path / 'plain.pt'}"]) == 0

    (tmp_path / "garbage.safetensors").write_bytes(b"not weights at all")
    (tmp_path / "garbage.pt").write_text("not a checkpoint")
    save_file({"w": torch.zeros(2)}, str(tmp_path / "alien.safetensors"),
              metadata={"format": "liqe-dist/weights-1", "family": "alien"})
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    scored = tmp_path / "scored"
    score_shards([one_image_tar(root, tmp_path / "x-000000.tar")], [ModelSpec("other", liqe)], scored,
                 precision="auto", eval_crops=1, progress=False)
    before = {p: tree(p) for p in (mine, scored, shards)}
    m = ["--model", f"liqe={liqe}"]
    cases = [
        ([*good, "--model", f"liqe={liqe}", "--model", f"liqe_scene={pmt}"], "'liqe_scene' and 'liqe' collide"),
        ([*good, "--model", f"a/b={liqe}"], "must be one plain name"),
        ([*good, "--model", f"liqe={tmp_path / 'missing.safetensors'}"], "missing.safetensors: no such file"),
        ([*good, "--model", f"liqe={tmp_path / 'garbage.safetensors'}"], "not a readable safetensors file"),
        ([*good, "--model", f"liqe={tmp_path / 'garbage.pt'}"], "neither a safetensors nor a torch weights file"),
        ([*good, "--model", f"liqe={tmp_path / 'alien.safetensors'}"], "unknown model family 'alien'"),
        (["score-shards", str(tmp_path / "nowhere"), "--check", "--out", str(tmp_path / "new"), *m],
         "not a packed shard set"),
        (["score-shards", str(shards), "--check", "--out", str(mine), *m], "holds files not written"),
        (["score-shards", str(shards), "--check", "--out", str(shards / "s"), *m], "lies inside the input"),
        (["score-shards", str(shards), "--check", "--out", str(scored), *m], "holds scores of other models"),
    ]
    for argv, message in cases:
        caplog.clear()
        assert main(argv) == 2, argv
        assert message in caplog.text, (argv, caplog.text)
    assert {p: tree(p) for p in (mine, scored, shards)} == before and not (tmp_path / "new").exists()
