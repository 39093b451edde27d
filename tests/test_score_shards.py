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
        assert row["liqe"] == pytest.approx(local.loc[row["key"], "liqe"], abs=1e-5)
        assert row["pmt"] == pytest.approx(local.loc[row["key"], "pmt"], abs=1e-5)
