"""The training loop on real ranks (spawned processes, gloo, DeepSpeed) and under Ray Train."""

import csv
import dataclasses
import math
import json
import shutil

import pytest
import torch
import torch.multiprocessing as mp
from scipy.stats import spearmanr

from dist_workers import train_configs_rank, train_rank
from liqe_dist.dist.local_group import free_local_port as free_port
from shard_fixtures import pack_csv, write_csv_dataset
from liqe_dist.models.weights import load_weights
from liqe_dist.config import ConfigError, load_yaml, to_dict
from liqe_dist.data.crops import CropConfig
from liqe_dist.dist.engine import OptimConfig
from liqe_dist.models.liqe.config import LIQEConfig
from liqe_dist.models.pmt_iqa.config import PMTIQAConfig
from liqe_dist.train.config import DatasetSpec, TrainConfig
from liqe_dist.train.weighting import WeightingConfig

pytestmark = pytest.mark.slow  # real processes: seconds to a minute each


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    base = tmp_path_factory.mktemp("train")
    a = pack_csv(write_csv_dataset(base / "a", n_refs=10, per_ref=3, size=(232, 224)), base / "shards", "a",
                 shard_max_count=5)
    b = pack_csv(write_csv_dataset(base / "b", n_refs=10, per_ref=2, size=(224, 240)), base / "shards", "b",
                 shard_max_count=50)
    return base, a, b


def config(base, a, b, **kw) -> TrainConfig:
    args = dict(datasets=[DatasetSpec("a", str(a), 2), DatasetSpec("b", str(b), 1)],
                model=LIQEConfig(name="liqe-tiny"), optim=OptimConfig(lr=1e-4, zero_stage=1),
                weighting=WeightingConfig(period_steps=2), crops=CropConfig(train_crops=1, eval_crops=2),
                epochs=3, steps_per_epoch=4, checkpoint_every=4, keep_checkpoints=2, workers=2,
                eval_batch=8, out_dir=str(base / "runs"), name="two", shuffle_buffer=4)
    args.update(kw)
    return TrainConfig(**args)


def rows(path):
    return list(csv.DictReader(open(path)))


def test_two_ranks_train_evaluate_checkpoint_and_resume(shards):
    base, a, b = shards
    cfg = config(base, a, b)
    mp.spawn(train_rank, args=(2, free_port(), to_dict(cfg)), nprocs=2, join=True)
    run = base / "runs" / "two"
    steps = rows(run / "steps.csv")
    assert [int(r["step"]) for r in steps] == list(range(1, 13))
    lams = [float(r["lambda/quality"]) for r in steps]
    assert lams[:4] == [1.0] * 4 and len(set(lams[4:])) > 1  # DWA moves after two periods of 2 steps
    assert all(float(r["images_per_second"]) > 0 for r in steps)
    evals = rows(run / "eval.csv")
    assert [int(r["step"]) for r in evals] == [4, 8, 12]
    for r in evals:  # the logged criteria are those of the logged predictions
        preds = [p for p in rows(run / "predictions" / f"step-{int(r['step']):08d}.csv") if p["dataset"] == "a"]
        srcc = spearmanr([float(p["score"]) for p in preds], [float(p["mos"]) for p in preds])[0]
        assert float(r["test/a/srcc"]) == pytest.approx(srcc, abs=1e-9)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000008", "step-00000012"]
    for f in ("best.safetensors", "final.safetensors", "curves.png", "scatter.png", "best.json"):
        assert (run / f).exists(), f
    load_weights(run / "best.safetensors")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = EventAccumulator(str(run / "tb"))
    tb.Reload()
    assert {"loss", "loss/quality", "lambda/scene", "test/a/srcc"} <= set(tb.Tags()["scalars"])
    assert [e.step for e in tb.Scalars("loss")] == list(range(1, 13))
    # a crash after step 12 but before its checkpoint: the run resumes at 8 and redoes 9..12
    shutil.rmtree(run / "checkpoints" / "step-00000012")
    mp.spawn(train_rank, args=(2, free_port(), to_dict(cfg)), nprocs=2, join=True)
    assert [int(r["step"]) for r in rows(run / "steps.csv")] == list(range(1, 13))
    assert [int(r["step"]) for r in rows(run / "eval.csv")] == [4, 8, 12]
    tb = EventAccumulator(str(run / "tb"))
    tb.Reload()
    assert [e.step for e in tb.Scalars("loss")] == list(range(1, 13))  # the redone 9..12 once each
    assert [e.step for e in tb.Scalars("test/a/srcc")] == [4, 8, 12]
    # the run recorded its config and each start
    assert load_yaml(TrainConfig, run / "config.yaml") == dataclasses.replace(
        cfg, out_dir=str(base / "runs"), datasets=[dataclasses.replace(d, shards=str(d.shards)) for d in cfg.datasets])
    assert [r["resumed_from"] for r in json.loads((run / "run.json").read_text())["runs"]] == [
        None, str(run / "checkpoints" / "step-00000008")]
    # extend the finished run: it resumes from step 12 instead of starting again
    more = config(base, a, b, epochs=4)
    mp.spawn(train_rank, args=(2, free_port(), to_dict(more)), nprocs=2, join=True)
    steps = rows(run / "steps.csv")
    assert [int(r["step"]) for r in steps] == list(range(1, 17))  # none repeated, none lost
    events = [json.loads(line) for line in open(run / "events.jsonl")]
    assert [e["event"] for e in events] == ["start", "finish", "resume", "finish", "resume", "finish"]
    assert (events[2]["step"], events[2]["redone_steps"]) == (8, 4)
    assert (events[4]["step"], events[4]["redone_steps"]) == (12, 0)
    # the weighting state came back: lambda continues from the saved history, not from 1, 1, 1
    assert float(steps[12]["lambda/quality"]) != 1.0


MODEL_VARIANTS = {
    "vit": LIQEConfig(name="liqe-tiny"),
    "resnet-batchnorm": LIQEConfig(name="liqe-tiny-rn"),
    "separate-templates": LIQEConfig(name="liqe-tiny", separate_templates=True),
    "linear-head": LIQEConfig(name="liqe-tiny", head="linear", tasks=("quality",)),
    "pmt-iqa": PMTIQAConfig(width=8),
}


@pytest.fixture(scope="module")
def variant_runs(shards) -> dict[str, TrainConfig]:
    """A 2-rank run of each model variant, one after the other in the same two processes."""
    base, a, b = shards
    cfgs = {}
    for variant, model in MODEL_VARIANTS.items():
        extra = {"weighting": WeightingConfig(method="progressive")} if variant == "pmt-iqa" else {}
        cfgs[variant] = config(base, a, b, name=f"saved-{variant}", model=model, epochs=1, steps_per_epoch=3,
                               checkpoint_every=3, eval_parts=("test",), **extra)
    mp.spawn(train_configs_rank, args=(2, free_port(), [to_dict(c) for c in cfgs.values()]), nprocs=2, join=True)
    return cfgs


@pytest.mark.parametrize("variant", list(MODEL_VARIANTS))
def test_saved_weights_score_as_the_run_evaluated(shards, variant_runs, variant):
    """A 2-rank run of each model variant (including ablations 4 and 6) trains, and its final
    weights, scored in one process, give the per-image test scores the run logged: distributed
    evaluation is exact and every rank evaluates the model rank 0 saves."""
    from liqe_dist.eval.shard_eval import evaluate_shards

    base, a, b = shards
    cfg = variant_runs[variant]
    run = base / "runs" / f"saved-{variant}"
    losses = rows(run / "steps.csv")[-1]
    assert all(float(losses[f"loss/{t}"]) > 0 for t in cfg.model.loss_tasks)
    logged = {(r["dataset"], r["key"]): float(r["score"]) for r in rows(run / "predictions" / "step-00000003.csv")}
    results = evaluate_shards(load_weights(run / "final.safetensors"), [a, b], cfg.split, "test", cfg.crops,
                              progress=False)
    scored = {(name, k): s for name, ev in results.items() for k, s in zip(ev.keys, ev.score)}
    assert scored.keys() == logged.keys() and len(scored) == 10
    assert max(abs(scored[k] - logged[k]) for k in scored) < 1e-5


def test_killed_worker_resumes_from_checkpoint(shards, monkeypatch):
    """Ray Train with 2 workers, paths in the config relative to where the user runs (Ray workers
    start elsewhere). A rank killed mid-run (SIGKILL): Ray restarts the worker group, training
    resumes from the newest checkpoint, finishes, and every step appears once in the log; at
    most one checkpoint interval of steps is redone."""
    import os
    import signal
    import threading
    import time

    import ray
    from liqe_dist.run.ray_train import run_training

    base, a, b = shards
    monkeypatch.chdir(base)
    cfg = config(base, a.relative_to(base), b.relative_to(base), name="kill", epochs=4, steps_per_epoch=4,
                 checkpoint_every=4, max_failures=1, eval_parts=("test",), out_dir="runs")
    run = base / "runs" / "kill"
    killed = {}

    def killer():
        deadline = time.time() + 240
        while time.time() < deadline and not killed:
            try:
                done = len(rows(run / "steps.csv"))
            except (FileNotFoundError, StopIteration, KeyError):
                done = 0
            if done >= 6:
                pid = json.loads((run / "ranks" / "rank-1.json").read_text())["pid"]
                os.kill(pid, signal.SIGKILL)
                killed.update(pid=pid, after=done)
            time.sleep(0.05)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    try:
        metrics = run_training(cfg)
    finally:
        ray.shutdown()
    thread.join(timeout=5)
    assert killed, "the worker was never killed"
    assert metrics["step"] == 16 and "test/a/srcc" in metrics
    assert [int(r["step"]) for r in rows(run / "steps.csv")] == list(range(1, 17))
    events = [json.loads(line) for line in open(run / "events.jsonl")]
    resumes = [e for e in events if e["event"] == "resume"]
    assert len(resumes) == 1 and resumes[0]["step"] in (4, 8, 12)
    assert resumes[0]["redone_steps"] <= 4  # no more than one checkpoint interval lost
    assert events[-1] == {**events[-1], "event": "finish", "step": 16}
    assert json.loads((run / "ranks" / "rank-1.json").read_text())["pid"] != killed["pid"]  # a new process took over
    import sys

    starts = json.loads((run / "run.json").read_text())["runs"]  # the driver's command, not a Ray worker's
    assert len(starts) == 2 and all(r["command"] == sys.argv and r["cwd"] == str(base) for r in starts)


def test_missing_shards_fail_before_ray_starts(tmp_path):
    from liqe_dist.run.ray_train import run_training
    import ray

    cfg = config(tmp_path, tmp_path / "nope", tmp_path / "nope2")
    with pytest.raises(ConfigError, match=r"datasets\[0\]\.shards: .*nope.*no manifest"):
        run_training(cfg)
    assert not ray.is_initialized()


def test_bf16_run_trains_checkpoints_and_resumes(shards):
    """Two ranks in bf16 (the GPU precision, on the CPU) with the ResNet tower: the run trains,
    its weight files hold the float32 masters, and a resume from the middle checkpoint goes on."""
    from safetensors.torch import load_file

    base, a, b = shards
    cfg = config(base, a, b, name="bf16", model=LIQEConfig(name="liqe-tiny-rn"), epochs=2, steps_per_epoch=2,
                 checkpoint_every=2, optim=OptimConfig(lr=1e-3, zero_stage=1, precision="bf16"), eval_parts=("test",))
    mp.spawn(train_rank, args=(2, free_port(), to_dict(cfg)), nprocs=2, join=True)
    run = base / "runs" / "bf16"
    weights = load_file(str(run / "final.safetensors"))
    assert all(v.dtype != torch.bfloat16 for v in weights.values())
    assert any((v != v.bfloat16().float()).any() for v in weights.values() if v.is_floating_point())
    shutil.rmtree(run / "checkpoints" / "step-00000004")
    mp.spawn(train_rank, args=(2, free_port(), to_dict(cfg)), nprocs=2, join=True)
    steps = rows(run / "steps.csv")
    assert [int(r["step"]) for r in steps] == [1, 2, 3, 4]
    assert all(math.isfinite(float(r["loss"])) for r in steps)
    events = [json.loads(line) for line in open(run / "events.jsonl")]
    assert [e["event"] for e in events] == ["start", "finish", "resume", "finish"]
