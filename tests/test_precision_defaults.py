"""Every entry point with a precision default resolves it the same on every CPU: reported numbers
(score, eval, load()) are fp32 unless bf16 is asked for; corpus scoring's ``auto`` follows the
hardware and records what it used; training on the CPU stays fp32. Each is run under both
branches of the bf16 detection (``LIQE_NATIVE_BF16`` forces it, whatever this CPU has)."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

import liqe_dist
from liqe_dist.cli import main
from liqe_dist.data.corpus import CorpusConfig, pack_corpus
from liqe_dist.dist.engine import OptimConfig, training_precision
from liqe_dist.eval.score_shards import ModelSpec, score_shards
from liqe_dist.hardware import NATIVE_BF16_ENV, native_bf16, resolve_precision
from liqe_dist.models.liqe.config import LIQEConfig
from liqe_dist.models.registry import build_model
from liqe_dist.models.weights import save_weights

BRANCHES = ["0", "1"]  # the CPU emulates bf16 / computes it natively


@pytest.fixture(params=BRANCHES, ids=["emulated-bf16", "native-bf16"])
def branch(request, monkeypatch) -> bool:
    monkeypatch.setenv(NATIVE_BF16_ENV, request.param)
    return request.param == "1"


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    root = tmp_path_factory.mktemp("precision")
    torch.manual_seed(0)
    save_weights(build_model(LIQEConfig(name="liqe-tiny")), root / "liqe.safetensors")
    rng = np.random.default_rng(0)
    (root / "photos").mkdir()
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (230, 240, 3), dtype=np.uint8)).save(root / "photos" / f"p{i}.png")
    return root


def test_the_override_decides_detection(branch):
    assert native_bf16("cpu") is branch
    assert resolve_precision("auto", "cpu") == ("bf16" if branch else "fp32")
    assert resolve_precision("auto", "cpu", cpu_flags=frozenset()) == "fp32"  # explicit flags still win


def test_load_defaults_to_fp32_and_the_cli_batch(branch, weights):
    scorer = liqe_dist.load(checkpoint=str(weights / "liqe.safetensors"), device="cpu")
    assert scorer.model.dtype == torch.float32 and scorer.batch_images == 2
    assert liqe_dist.load(checkpoint=str(weights / "liqe.safetensors"), precision="bf16",
                          device="cpu").model.dtype == torch.bfloat16


def test_score_defaults_to_fp32_and_says_so(branch, weights, tmp_path, caplog):
    out = tmp_path / "scores.csv"
    with caplog.at_level(logging.INFO, logger="liqe_dist"):
        assert main(["score", str(weights / "photos"), "--checkpoint", str(weights / "liqe.safetensors"),
                     "--device", "cpu", "--output", str(out), "--no-progress"]) == 0
    [start] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("scoring: ")]
    assert "on cpu, fp32, 15 crops of 224 px per image, 2 image(s) per batch" in start


def test_eval_defaults_to_fp32(branch, weights, tmp_path, caplog):
    from shard_fixtures import pack_csv, write_csv_dataset

    shards = pack_csv(write_csv_dataset(tmp_path / "raw", n_refs=1, per_ref=2), tmp_path / "shards")
    with caplog.at_level(logging.INFO, logger="liqe_dist"):
        assert main(["eval", str(shards), "--checkpoint", str(weights / "liqe.safetensors"), "--device", "cpu",
                     "--part", "all", "--workers", "0", "--no-progress", "--out", str(tmp_path / "e")]) == 0
    [start] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("evaluating: ")]
    assert ", fp32, " in start
    assert json.loads((tmp_path / "e" / "run.json").read_text())["runs"][-1]["precision"] == "fp32"
    assert str(shards.resolve()) in (tmp_path / "e" / "config.yaml").read_text()


def test_score_shards_auto_follows_the_hardware_and_records_it(branch, weights, tmp_path):
    corpus = pack_corpus(weights / "photos", tmp_path / "shards" / "photos", "photos", CorpusConfig(workers=1),
                         progress=False)
    score_shards([corpus.out_dir], [ModelSpec("liqe", str(weights / "liqe.safetensors"))], tmp_path / "s",
                 device="cpu", eval_crops=1, progress=False)
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert manifest["precision_requested"] == "auto"
    assert manifest["runs"][-1]["precision"] == (["bf16"] if branch else ["fp32"])
    run = json.loads((tmp_path / "s" / "run.json").read_text())["runs"][-1]
    assert run["precision"] == manifest["runs"][-1]["precision"] and run["images"] == 2


def test_cpu_training_stays_fp32(branch):
    assert training_precision(OptimConfig(), use_gpu=False) == "fp32"
    assert training_precision(OptimConfig(), use_gpu=True, cuda_bf16=True) == "bf16"
