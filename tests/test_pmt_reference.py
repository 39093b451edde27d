"""PMT-IQA's reference regime (the public code's training, ``model.recipe: reference``), knob by
knob against hand-computed values: the per-dataset class rules on their bin edges, raw targets,
fixed loss weights, the public lr steps over 30 epochs, the optimiser reset every epoch, one pass
an epoch, 80/20 parts, test selection; the reference configs through ``--check`` and one step of
every dataset's run; the protocol's report with the published figures."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from conftest import jpeg_bytes, photo
from dist_workers import optimizer_reset_rank, train_configs_rank
from liqe_dist.config import ConfigError, from_dict, load_yaml, to_dict
from liqe_dist.data.packing import PackConfig, pack_records, read_manifest
from liqe_dist.data.records import Record
from liqe_dist.data.stream import DatasetSpec
from liqe_dist.dist.engine import OptimConfig, build_optimizer, step_factor
from liqe_dist.dist.local_group import free_local_port
from liqe_dist.models.pmt_iqa.config import PMTIQAConfig
from liqe_dist.models.pmt_iqa.model import PMTIQA
from liqe_dist.models.pmt_iqa.objective import pmt_losses
from liqe_dist.models.pmt_iqa.targets import per_dataset_classes
from liqe_dist.models.weights import load_weights, save_weights
from liqe_dist.train.config import TrainConfig, steps_per_pass
from liqe_dist.train.weighting import WeightingConfig, build_weighting

CONFIGS = Path(__file__).resolve().parents[1] / "launch" / "configs"
SCALES = {"live": (0.0, 100.0), "csiq": (0.0, 1.0), "clive": (0.0, 100.0), "koniq10k": (1.0, 5.0), "bid": (0.0, 5.0)}


def pack(root: Path, dataset: str, n: int = 20, side: int = 256) -> Path:
    """A tiny packed set named ``dataset`` with MOS on its scale (KonIQ with MOS_zscore in extra)."""
    lo, hi = SCALES[dataset]
    records = []
    for i in range(n):
        m = lo + (hi - lo) * i / (n - 1)
        extra = {"mos_zscore": 100.0 * i / (n - 1)} if dataset == "koniq10k" else {}
        records.append(Record(key=f"{dataset}_{i:03d}", dataset=dataset, mos=m, source=f"test:{i}",
                              data=jpeg_bytes(photo(side + 8 * (i % 3), side, seed=i)), ext="jpg",
                              reference=f"ref{i // 2}", extra=extra))
    out = root / "shards" / dataset
    pack_records(records, out, dataset, {"format": "test"}, PackConfig(), progress=False)
    return out


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("reference")
    return root, {name: pack(root, name) for name in SCALES}


def test_public_class_rules_on_the_bin_edges():
    """Each dataset's rule on the public code's label, its rounding (half to even) at the exact
    halves, and the values that give 10 clipped to 9 (CSIQ's worst images, CLIVE and BID's best)."""
    cases = {
        # LIVE packed as 100 - DMOS; class int(|DMOS / 10|), 9 from DMOS 100
        "live": ([0.0, 9.5, 10.0, 19.5, 95.0, 100.0, 105.0], [0, 0, 1, 1, 9, 9, 9], lambda d: 100.0 - d),
        # CSIQ packed as 1 - DMOS; round(DMOS * 10): 2.5 -> 2, 7.5 -> 8, 9.6875 -> 10 -> 9
        "csiq": ([0.0, 0.125, 0.25, 0.75, 0.9375, 0.96875, 1.0], [0, 1, 2, 8, 9, 9, 9], lambda d: 1.0 - d),
        # round(MOS / 10): 0.5 -> 0, 1.5 -> 2, 2.5 -> 2, 9.5 -> 10 -> 9
        "clive": ([0.0, 4.9, 5.0, 15.0, 25.0, 94.9, 95.0, 100.0], [0, 0, 0, 2, 2, 9, 9, 9], lambda m: m),
        "koniq10k": ([5.0, 15.0, 35.0, 95.0], [0, 2, 4, 9], lambda z: z),
        # int(MOS / 0.5): 5.0 -> 10 -> 9
        "bid": ([0.0, 0.49, 0.5, 2.5, 4.99, 5.0], [0, 0, 1, 5, 9, 9], lambda m: m),
    }
    for name, (public, expected, packed) in cases.items():
        labels = torch.tensor([packed(v) for v in public], dtype=torch.float32)
        got = per_dataset_classes(labels, torch.zeros(len(public), dtype=torch.long), (name,))
        assert got.tolist() == expected, name
    # CSIQ as packed (1 - DMOS in float64): the file's DMOS come back before the float32 cast, so
    # 0.05 -> 0.5 -> 0 and 0.15 -> 1.5 -> 2 as the code; from float32 MOS they would give 1 and 1
    packed = torch.tensor([1 - 0.05, 1 - 0.15], dtype=torch.float64)
    assert per_dataset_classes(packed, torch.zeros(2, dtype=torch.long), ("csiq",)).tolist() == [0, 2]
    assert per_dataset_classes(packed.float(), torch.zeros(2, dtype=torch.long), ("csiq",)).tolist() == [1, 1]
    # several datasets in one batch: each sample by its own dataset's rule
    mixed = per_dataset_classes(torch.tensor([5.0, 5.0]), torch.tensor([0, 1]), ("clive", "bid"))
    assert mixed.tolist() == [0, 9]


def test_collated_labels_reach_the_rules_with_their_own_digits():
    """From CropSamples through collate to the loss targets: CSIQ's 1 - DMOS in float64, so DMOS
    0.05 is class 0 and 0.15 class 2 as in the public code (float32 MOS would give 1 and 1)."""
    from liqe_dist.data.stream import CropSample, collate
    from liqe_dist.models.pmt_iqa.objective import targets

    pixels = torch.zeros(1, 3, 224, 224, dtype=torch.uint8)
    samples = [CropSample(f"k{i}", "csiq", pixels, 1 - d, (), None) for i, d in enumerate((0.05, 0.15, 0.96875))]
    batch = collate(samples, [0, 0, 0], mos_ranges=[(0.0, 1.0)])
    cfg = PMTIQAConfig(width=8, recipe="reference", class_datasets=("csiq",), target_range=(0.0, 1.0))
    target, labels = targets(cfg, batch)
    assert labels.tolist() == [0, 2, 9] and target.tolist() == pytest.approx([0.95, 0.85, 0.03125])


def test_recipe_sets_each_knob_and_a_knob_overrides_it():
    paper, ref = PMTIQAConfig(), PMTIQAConfig(recipe="reference")
    assert (paper.target_scale, paper.class_rule) == ("unit", "unit_bins")
    assert (ref.target_scale, ref.class_rule) == ("raw", "per_dataset")
    assert PMTIQAConfig(recipe="reference", target_scale="unit").target_scale == "unit"
    assert ref.optim_defaults == {"schedule": "step", "step_delay_epochs": 1, "reset_each_epoch": True}
    with pytest.raises(ValueError, match="model.recipe"):
        PMTIQAConfig(recipe="public")
    with pytest.raises(ValueError, match="per_dataset is the public code's 10-class"):
        PMTIQAConfig(recipe="reference", classes=5)


def test_binding_reads_range_and_names_from_the_manifests(shards):
    _, sets = shards
    bid = [DatasetSpec("bid", str(sets["bid"]))]
    cfg = PMTIQAConfig(width=8, recipe="reference").bind_data(bid)
    assert cfg.target_range == tuple(read_manifest(sets["bid"])["mos_range"]) == (0.0, 5.0)
    assert cfg.class_datasets == ("bid",)
    koniq = PMTIQAConfig(width=8, recipe="reference").bind_data(
        [DatasetSpec("koniq10k", str(sets["koniq10k"]), label="mos_zscore")])
    assert koniq.target_range == (0.0, 100.0)  # the z-scores' range, from extra_ranges
    with pytest.raises(ValueError, match="one dataset's own labels a run"):
        PMTIQAConfig(recipe="reference").bind_data(bid + [DatasetSpec("clive", str(sets["clive"]))])
    with pytest.raises(ValueError, match="koniq10k's rule reads 'mos_zscore'"):
        PMTIQAConfig(recipe="reference").bind_data([DatasetSpec("k", str(sets["koniq10k"]))])
    assert PMTIQAConfig().bind_data(bid) == PMTIQAConfig()  # the paper recipe reads nothing


def test_raw_targets_and_public_classes_in_the_losses():
    torch.manual_seed(0)
    model = PMTIQA(PMTIQAConfig(width=8, recipe="reference", class_datasets=("bid",), target_range=(0.0, 5.0)))
    x = torch.randint(0, 256, (3, 2, 3, 224, 224), dtype=torch.uint8)
    mos = torch.tensor([4.2, 5.0, float("nan")])
    batch = {"images": x, "has_mos": ~mos.isnan(), "mos": mos, "mos_unit": mos / 5,
             "dataset": torch.zeros(3, dtype=torch.long)}
    terms = pmt_losses(model, batch, 10)
    q, logits = model(x)
    l1 = (q[0] - 4.2).abs().sum() + (q[1] - 5.0).abs().sum()  # raw MOS, not MOS / 5
    ce = F.cross_entropy(logits[:2].flatten(0, 1), torch.tensor([8, 8, 9, 9]), reduction="sum")
    assert terms["regression"].total.item() == pytest.approx(l1.item(), rel=1e-5)
    assert terms["classification"].total.item() == pytest.approx(ce.item(), rel=1e-5)
    # predict maps the raw output onto 1-5 with the recorded range
    model.eval()
    with torch.no_grad():
        q, _ = model(x)
        assert torch.allclose(model.predict(x).quality, 1 + 4 * (q.mean(1) / 5.0), atol=1e-6)


def test_weights_record_the_targets(tmp_path):
    model = PMTIQA(PMTIQAConfig(width=8, recipe="reference", class_datasets=("clive",), target_range=(3.0, 92.0)))
    save_weights(model, tmp_path / "w.safetensors")
    back = load_weights(tmp_path / "w.safetensors")
    assert (back.cfg.target_scale, back.cfg.target_range) == ("raw", (3.0, 92.0))
    x = torch.randint(0, 256, (2, 1, 3, 224, 224), dtype=torch.uint8)
    model.eval(), back.eval()
    with torch.no_grad():
        assert torch.equal(model.predict(x).quality, back.predict(x).quality)


def test_fixed_weights_stay_fixed():
    lam = {"regression": 0.9419036108703593, "classification": 0.9602831644731372}
    w = build_weighting(WeightingConfig(method="fixed", weights=lam), ("classification", "regression"), 2, 10)
    for _ in range(7):
        assert w.weights() == lam
        w.observe({"classification": 2.0, "regression": 0.5})
    with pytest.raises(ValueError, match="every task"):
        build_weighting(WeightingConfig(method="fixed", weights={"regression": 1.0}), ("classification", "regression"), 2)
    with pytest.raises(ValueError, match="only there"):
        WeightingConfig(method="progressive", weights=lam)
    with pytest.raises(ValueError, match=">= 0"):
        WeightingConfig(method="fixed", weights={"regression": float("nan"), "classification": 1.0})


def test_lr_per_epoch_is_the_public_formula_for_30_epochs():
    """The public code sets lr / 10 ** (t // 6) after epoch t: epoch e >= 1 trains at
    lr / 10 ** ((e - 1) // 6). StepLR (delay 0) decays one epoch earlier."""
    lr, steps = 1.0933302953170044e-4, 3
    model = torch.nn.Linear(2, 1)
    opt, sched = build_optimizer(model, OptimConfig(optimizer="adam", lr=lr, schedule="step", step_delay_epochs=1),
                                 total_steps=30 * steps, steps_per_epoch=steps)
    got = []
    for _ in range(30):
        got.append(sched.get_last_lr()[0])
        for _ in range(steps):
            opt.step()
            sched.step()
    public = [lr] + [lr / 10 ** ((e - 1) // 6) for e in range(1, 30)]
    assert got == pytest.approx(public, rel=1e-12)
    assert [step_factor(e, 6, 0.1) for e in (5, 6, 12)] == pytest.approx([1.0, 0.1, 0.01])  # StepLR's
    assert [step_factor(e, 6, 0.1, 1) for e in (6, 7, 13, 19)] == pytest.approx([1.0, 0.1, 0.01, 0.001])


@pytest.mark.parametrize("stage", [0, 1])
def test_optimizer_reset_equals_a_new_optimizer(tmp_path, stage):
    out = tmp_path / "reset.pt"
    mp.spawn(optimizer_reset_rank, args=(1, free_local_port(), str(out), stage), nprocs=1, join=True)
    got = torch.load(out, weights_only=True)
    assert got["empty"]
    for k in got["reset"]:
        assert torch.allclose(got["reset"][k], got["fresh"][k], rtol=0, atol=1e-7), k
    assert any(not torch.allclose(got["reset"][k], got["kept"][k], atol=1e-4) for k in got["reset"])


def test_one_pass_an_epoch_and_the_80_20_parts(shards):
    _, sets = shards
    counts = read_manifest(sets["bid"])["splits"]["counts"][3]
    spec = [DatasetSpec("bid", str(sets["bid"]), batch_size=3)]
    assert steps_per_pass(spec, 3, 2) == -(-counts["train"] // 6)
    assert steps_per_pass(spec, 3, 1, ("train", "val")) == -(-(counts["train"] + counts["val"]) // 3)
    cfg = TrainConfig(datasets=spec, model=PMTIQAConfig(width=8), epoch_length="pass", split=3, workers=1,
                      train_parts=("train", "val"), eval_parts=("test",), selection="test")
    assert cfg.steps_per_epoch == -(-(counts["train"] + counts["val"]) // 3) and cfg.total_steps == 80 * cfg.steps_per_epoch
    with pytest.raises(ValueError, match="eval_parts: val is trained on"):
        replace(cfg, eval_parts=("val", "test"))
    with pytest.raises(ValueError, match="train_parts"):
        replace(cfg, train_parts=("val",))
    with pytest.raises(ValueError, match="epoch_length: pass needs datasets.x"):
        TrainConfig(datasets=[DatasetSpec("x", "/nonexistent")], epoch_length="pass")
    assert replace(cfg, workers=2).steps_per_epoch == -(-(counts["train"] + counts["val"]) // 6)  # recomputed
    with pytest.raises(ValueError, match="selection: the best step is chosen on val, which eval_parts"):
        replace(cfg, train_parts=("train",), selection="val")


def test_reference_config_resolves_knob_by_knob(shards, monkeypatch):
    root, _ = shards
    monkeypatch.chdir(root)
    from liqe_dist.config import read_yaml

    data = read_yaml(CONFIGS / "pmt_iqa_reference.yaml")
    data["model"].update(pretrained=None, width=8)  # nothing downloaded in tests
    cfg = from_dict(TrainConfig, data)
    m = cfg.model
    assert (m.recipe, m.target_scale, m.class_rule, m.class_datasets, m.target_range) == \
        ("reference", "raw", "per_dataset", ("bid",), (0.0, 5.0))
    assert (cfg.optim.schedule, cfg.optim.step_delay_epochs, cfg.optim.reset_each_epoch) == ("step", 1, True)
    assert cfg.optim.lr == 1.0933302953170044e-4 and cfg.optim.optimizer == "adam"
    assert cfg.weighting.method == "fixed" and cfg.epochs == 30
    assert cfg.datasets[0].resize == (512, 512) and cfg.datasets[0].batch_size == 12
    assert (cfg.crops.positions, cfg.crops.flip_per_crop, cfg.crops.train_crops, cfg.crops.eval_crops) == \
        ("random", True, 4, 4)
    assert (cfg.train_parts, cfg.eval_parts, cfg.selection) == (("train", "val"), ("test",), "test")
    counts = read_manifest(root / "shards" / "bid")["splits"]["counts"][0]
    assert cfg.steps_per_epoch == -(-(counts["train"] + counts["val"]) // 12)
    paper = load_yaml(TrainConfig, CONFIGS / "pmt_iqa_paper.yaml",
                      {"model.pretrained": None, "model.width": 8,
                       "datasets": [{"name": n, "shards": f"shards/{n}", "batch_size": 3} for n in SCALES]})
    assert (paper.model.recipe, paper.model.target_scale, paper.model.class_rule) == ("paper", "unit", "unit_bins")
    assert (paper.optim.lr, paper.steps_per_epoch, paper.weighting.method, len(paper.datasets)) == \
        (1e-4, 500, "progressive", 5)
    assert (paper.optim.step_delay_epochs, paper.optim.reset_each_epoch, paper.selection_part) == (0, False, "val")
    data["optim"]["reset_each_epoch"] = False  # one knob alone
    assert from_dict(TrainConfig, data).optim.reset_each_epoch is False
    with pytest.raises((ConfigError, ValueError), match="class_rule"):
        from_dict(TrainConfig, {**data, "model": {**data["model"], "class_rule": "bins"}})


def protocol_overrides() -> dict:
    return {"train.model.pretrained": None, "train.model.width": 8, "train.use_gpu": False, "train.epochs": 1,
            "train.eval_batch": 4, "train.shuffle_buffer": 4}


@pytest.mark.slow
def test_every_datasets_reference_run_takes_a_step(shards, monkeypatch):
    """One step (one epoch of a pass on 1 split, evaluated) of each dataset's reference run, as
    protocol_pmt_iqa.yaml's variants define them: raw labels, classes, resizes, KonIQ's z-scores."""
    root, _ = shards
    monkeypatch.chdir(root)
    from liqe_dist.tune.protocol import load_protocol

    protocol = load_protocol(CONFIGS / "protocol_pmt_iqa.yaml",
                             {**protocol_overrides(), "storage": str(root / "runs"), "splits": [0]})
    search = protocol.search()
    assert sorted(protocol.variants) == sorted(SCALES) and protocol.selection == "test"
    cfgs = []
    for variant in protocol.variants:
        cfg = search.trial_config({"split": 0, "variant": variant})
        cfg = replace(cfg, epochs=1, epoch_length="steps", steps_per_epoch=1, out_dir=str(root / "one-step"),
                      name=variant)
        cfgs.append(json.loads(json.dumps(to_dict(cfg))))
    mp.spawn(train_configs_rank, args=(1, free_local_port(), cfgs), nprocs=1, join=True)
    from liqe_dist.train.state import _allow_deepspeed_types

    _allow_deepspeed_types()
    for variant in protocol.variants:
        run = root / "one-step" / variant
        best = json.loads((run / "best.json").read_text())
        assert best["step"] == 1 and -1 <= best[f"test/{variant}/srcc"] <= 1, variant
        # the epoch's end reset Adam before the checkpoint (optim.reset_each_epoch)
        state = torch.load(run / "checkpoints" / "step-00000001" / "rank-0.pt", weights_only=True)
        assert state["optimizer"]["base_optimizer_state"]["state"] == {}, variant


def test_protocol_config_checks(shards, monkeypatch):
    """``liqe-dist protocol --check`` on protocol_pmt_iqa.yaml: every variant's trial config
    validated against the packed sets (raw labels, class rules, resizes, KonIQ's z-score range)."""
    from liqe_dist.cli import main

    root, _ = shards
    monkeypatch.chdir(root)
    sets = [f"--set={k}={json.dumps(v)}" for k, v in {**protocol_overrides(), "storage": str(root / "runs")}.items()]
    assert main(["protocol", "--config", str(CONFIGS / "protocol_pmt_iqa.yaml"), "--check", *sets]) == 0
    bad = sets + ['--set=variants.koniq10k.datasets=[{"name": "koniq10k", "shards": "shards/koniq10k"}]']
    assert main(["protocol", "--config", str(CONFIGS / "protocol_pmt_iqa.yaml"), "--check", *bad]) != 0


def test_resume_reads_an_older_record_with_the_new_keys_at_their_defaults(shards):
    from liqe_dist.train.config import resolved_config, resume_changes

    _, sets = shards
    cfg = TrainConfig(datasets=[DatasetSpec("bid", str(sets["bid"]))], model=PMTIQAConfig(width=8))
    old = resolved_config(cfg)
    for key in ("train_parts", "selection", "epoch_length"):  # keys a record of the last version lacks
        del old[key]
    del old["optim"]["step_delay_epochs"], old["model"]["recipe"], old["crops"]["positions"]
    assert resume_changes(old, resolved_config(cfg)) == []
    assert resume_changes(old, resolved_config(replace(cfg, selection="test", eval_parts=("test",)))) == \
        ["eval_parts: ['val', 'test'] -> ['test']", "selection: None -> 'test'"]
    # facts of the data compare as recorded: a set repacked with other labels or sizes shows
    ref = TrainConfig(datasets=[DatasetSpec("bid", str(sets["bid"]), batch_size=2)], epoch_length="pass",
                      model=PMTIQAConfig(width=8, recipe="reference"))
    recorded = resolved_config(ref)
    recorded["model"]["target_range"], recorded["steps_per_epoch"] = [1.0, 4.0], 100
    del recorded["datasets"][0]["label"]  # and a key missing inside a list item is filled
    assert resume_changes(recorded, resolved_config(ref)) == [
        "model.target_range[0]: 1.0 -> 0.0", "model.target_range[1]: 4.0 -> 5.0",
        f"steps_per_epoch: 100 -> {ref.steps_per_epoch}"]


def test_report_prints_the_published_figures_and_the_selection(tmp_path):
    from liqe_dist.tune.protocol import PROTOCOL_FILE, write_report

    for i, srcc in enumerate((0.80, 0.90)):
        trial = tmp_path / f"trial_{i:05d}"
        trial.mkdir()
        (trial / "params.json").write_text(json.dumps({"split": i, "variant": "bid"}))
        (trial / "best.json").write_text(json.dumps({"test/bid/srcc": srcc, "test/bid/plcc": srcc, "step": 3}))
    (tmp_path / PROTOCOL_FILE).write_text(json.dumps({"train": {"selection": "test"},
                                                      "published": {"bid": {"srcc": 0.874, "plcc": 0.894}}}))
    text = write_report(tmp_path).read_text()
    assert "at the best test step" in text and "optimistic" in text
    assert "| bid | 0.850 / 0.850 |" in text and "| published | 0.874 / 0.894 |" in text


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_single_dataset_protocol_runs_one_split(shards, monkeypatch):
    """protocol_pmt_iqa.yaml through Ray Tune on one split of two of its datasets (BID resized,
    KonIQ on z-scores), its report beside the published figures."""
    import ray

    from liqe_dist.run.ray_train import start_local_cluster
    from liqe_dist.tune.protocol import load_protocol, run_protocol

    root, _ = shards
    monkeypatch.chdir(root)
    full = load_protocol(CONFIGS / "protocol_pmt_iqa.yaml", {**protocol_overrides(), "storage": str(root / "runs")})
    variants = {k: full.variants[k] for k in ("bid", "koniq10k")}
    protocol = load_protocol(CONFIGS / "protocol_pmt_iqa.yaml",
                             {**protocol_overrides(), "train.epoch_length": "steps", "train.steps_per_epoch": 1,
                              "train.epochs": 3, "train.workers": 1, "storage": str(root / "runs"), "splits": [0],
                              "variants": variants})
    start_local_cluster(2)
    try:
        report = run_protocol(protocol)
    finally:
        ray.shutdown()
    text = report.read_text()
    assert "at the best test step" in text and "| published | 0.874 / 0.894 | 0.902 / 0.916 |" in text
    for trial in sorted(report.parent.glob("trial_*")):
        variant = json.loads((trial / "params.json").read_text())["variant"]
        best = json.loads((trial / "best.json").read_text())
        assert set(k.split("/")[0] for k in best if "/" in k) == {"test"}  # nothing trained is evaluated
        config = (trial / "config.yaml").read_text()
        assert "selection: test" in config and "target_scale: raw" in config, variant
        # three evaluations; the reported one is the best test step (the public code's figure)
        import csv

        rows = list(csv.DictReader(open(trial / "eval.csv")))
        assert len(rows) == 3
        scores = [float(r["test/mean_srcc"]) for r in rows]
        assert best["step"] == int(rows[scores.index(max(scores))]["step"]), variant


def test_auto_precision_scores_pmt_in_fp32(tmp_path):
    """The measured decision (launch/bench_precision.py): precision auto keeps PMT-IQA in fp32;
    an explicit bf16 is obeyed."""
    from liqe_dist.models.registry import load_model

    save_weights(PMTIQA(PMTIQAConfig(width=8)), tmp_path / "p.safetensors")
    assert load_model(str(tmp_path / "p.safetensors"), precision="bf16", requested="auto").dtype == torch.float32
    assert load_model(str(tmp_path / "p.safetensors"), precision="bf16", requested="bf16").dtype == torch.bfloat16


def test_eval_of_a_config_under_auto_keeps_pmt_in_fp32(shards, monkeypatch, caplog):
    """``liqe-dist eval --config ... --precision auto`` where auto would pick bf16 (patched: this
    machine may not compute bf16 natively): PMT-IQA is evaluated in fp32."""
    import logging

    import liqe_dist.hardware
    from liqe_dist.cli import main

    _, sets = shards
    monkeypatch.setattr(liqe_dist.hardware, "resolve_precision", lambda requested, device, **_: "bf16")
    config = CONFIGS / "demo_pmt_iqa.yaml"
    with caplog.at_level(logging.INFO):
        assert main(["eval", "--config", str(config), "--precision", "auto", "--workers", "0", "--no-progress",
                     str(sets["bid"])]) == 0
    assert "pmt_iqa on cpu, fp32" in caplog.text
    monkeypatch.setattr(PMTIQA, "auto_bf16", True)  # a family bf16 may score: it is
    caplog.clear()
    assert main(["eval", "--config", str(config), "--precision", "auto", "--workers", "0", "--no-progress",
                 str(sets["bid"])]) == 0
    assert "pmt_iqa on cpu, bf16" in caplog.text


@pytest.mark.slow
@pytest.mark.parametrize("world", [1, 2])
def test_a_bf16_run_evaluates_pmt_on_its_float32_masters(tmp_path, world):
    from dist_workers import make_pmt_init, make_problem, pmt_bf16_evaluation_rank
    from liqe_dist.models.pmt_iqa.model import PMTIQA as Model

    make_problem(tmp_path)
    make_pmt_init(tmp_path)
    mp.spawn(pmt_bf16_evaluation_rank, args=(world, free_local_port(), str(tmp_path)), nprocs=world, join=True)
    got = torch.load(tmp_path / f"pmt_bf16_eval_{world}.pt", weights_only=True)
    assert (got["dtype"], got["engine_dtype"]) == ("torch.float32", "torch.bfloat16")
    for name, value in got["masters"].items():
        assert torch.equal(got["state"][name], value.float()), name
    reference = Model(PMTIQAConfig(width=8))
    reference.load_state_dict(got["masters"])
    batch = torch.load(tmp_path / "batch.pt", weights_only=True)
    with torch.no_grad():
        expected = reference.eval().predict(batch["images"][:3]).quality
    assert torch.allclose(got["full"], expected, rtol=1e-6, atol=0)   # fp32 arithmetic on the masters
    assert (got["low"] - expected).abs().max() > 100 * (got["full"] - expected).abs().max()  # bf16's error
