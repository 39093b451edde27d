"""Every row of the paper's Tables 4 and 5 is a named config in launch/configs/ablations/ that
differs from the reference recipe in exactly its switch, builds, and trains one step (or, for
the zero-shot row, evaluates) through the real training loop."""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from dist_workers import train_configs_rank
from liqe_dist.models.weights import load_weights
from liqe_dist.config import load_yaml, to_dict
from liqe_dist.dist.local_group import free_local_port
from liqe_dist.models.registry import build_model
from liqe_dist.train.config import TrainConfig
from shard_fixtures import pack_csv, write_csv_dataset

CONFIGS = Path(__file__).resolve().parents[1] / "launch" / "configs"
REFERENCE = CONFIGS / "liqe_reference.yaml"

# config file -> the keys (dotted) in which it differs from liqe_reference.yaml, and their values
SWITCHES = {
    "t4_1_pretrained_clip_c2": {"model.quality_levels": 2, "model.tasks": ("quality",), "epochs": 0},
    "t4_2_finetuned_clip_c2": {"model.quality_levels": 2, "model.tasks": ("quality",)},
    "t4_3_frozen_text_encoder": {"model.freeze_text": True},
    "t4_4_separate_templates": {"model.separate_templates": True},
    "t4_5_equal_weights": {"weighting.method": "equal"},
    "t4_6_visual_encoder_only": {"model.head": "linear", "model.tasks": ("quality",)},
    "t4_7_liqe": {},
    "t5_1_quality": {"model.tasks": ("quality",)},
    "t5_2_scene": {"model.tasks": ("scene",)},
    "t5_3_distortion": {"model.tasks": ("distortion",)},
    "t5_4_quality_scene": {"model.tasks": ("quality", "scene")},
    "t5_5_quality_distortion": {"model.tasks": ("quality", "distortion")},
    "t5_6_all_tasks": {},
}


def flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = tuple(v) if isinstance(v, list) and k != "datasets" else v
    return out


def test_every_table_row_has_a_config_differing_in_exactly_its_switch():
    assert sorted(p.stem for p in (CONFIGS / "ablations").glob("*.yaml")) == sorted(SWITCHES)
    ref = flat(to_dict(load_yaml(TrainConfig, REFERENCE)))
    assert ref["model.loss.recipe"] == "reference" and ref["optim.schedule"] == "cosine_cycles"
    assert ref["model.pretrained"] == "openai"
    for stem, switch in SWITCHES.items():
        cfg = flat(to_dict(load_yaml(TrainConfig, CONFIGS / "ablations" / f"{stem}.yaml")))
        diff = {k: v for k, v in cfg.items() if k != "name" and v != ref[k]}
        assert diff == switch, stem


@pytest.fixture(scope="module")
def one_step_runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("ablations")
    shards = pack_csv(write_csv_dataset(base / "d", n_refs=10, per_ref=2, size=(224, 232)), base / "shards", "d")
    configs = {}
    for stem in SWITCHES:
        cfg = load_yaml(TrainConfig, CONFIGS / "ablations" / f"{stem}.yaml", {
            "model.name": "liqe-tiny", "model.pretrained": None, "use_gpu": False, "workers": 1,
            "datasets": [{"name": "d", "shards": str(shards), "batch_size": 3}], "out_dir": str(base / "runs"),
            "steps_per_epoch": 1, "crops.train_crops": 1, "crops.eval_crops": 1, "checkpoint_every": 1})
        configs[stem] = dataclasses.replace(cfg, epochs=min(cfg.epochs, 1))
    mp.spawn(train_configs_rank, args=(1, free_local_port(), [to_dict(c) for c in configs.values()]), nprocs=1,
             join=True)
    return configs


@pytest.mark.slow
@pytest.mark.parametrize("stem", list(SWITCHES))
def test_every_ablation_builds_and_runs_one_step(one_step_runs, stem):
    cfg = one_step_runs[stem]
    run = Path(cfg.run_dir)
    evals = list(csv.DictReader(open(run / "eval.csv")))
    trained = load_weights(run / "final.safetensors")
    torch.manual_seed(cfg.seed)
    initial = build_model(cfg.model)  # the weights the run started from
    vocab = trained.vocabulary
    assert vocab == cfg.model.vocabulary()
    assert (trained.head is not None) == (cfg.model.head == "linear")
    text_changed = not torch.equal(trained.clip.token_embedding.weight, initial.clip.token_embedding.weight)
    image_changed = not torch.equal(trained.clip.visual.conv1.weight, initial.clip.visual.conv1.weight)
    if cfg.epochs == 0:  # zero-shot: evaluated as built, nothing trained
        assert [int(r["step"]) for r in evals] == [0] and not (run / "steps.csv").exists()
        assert not text_changed and not image_changed
        assert vocab.qualities == ("bad", "good") and vocab.size == 2
        return
    steps = list(csv.DictReader(open(run / "steps.csv")))
    assert [int(r["step"]) for r in steps] == [1] and [int(r["step"]) for r in evals] == [1]
    assert {k[5:] for k in steps[0] if k.startswith("loss/")} == set(cfg.model.tasks)
    assert float(steps[0]["loss"]) > 0
    assert float(steps[0]["lr"]) == pytest.approx(5e-6)  # epoch 0 of the reference cycles
    assert image_changed
    assert text_changed == (not cfg.model.freeze_text and cfg.model.head == "prompts")
