"""`gmad search --calibrate`: each model's recorded checkpoint scores a labelled shard set, the
toolbox's logistic maps its scores onto that MOS, the levels are formed on the mapped scores;
refusals for a model without a checkpoint, a changed checkpoint, an unlabelled set, a failed fit."""

from __future__ import annotations

import csv
import json
import warnings

import numpy as np
import pytest
import torch
import yaml
from scipy import optimize, stats

from liqe_dist.data.corpus import CorpusConfig, pack_corpus
from liqe_dist.eval.metrics import logistic4
from liqe_dist.eval.score_shards import ModelSpec, score_shards
from liqe_dist.eval.scoring import Scorer, default_crops
from liqe_dist.eval.shard_eval import evaluate_shards
from liqe_dist.gmad.calibrate import Logistic, calibrate, fit_logistic_map
from liqe_dist.gmad.report import run_gmad
from liqe_dist.gmad.scores import read_scores
from liqe_dist.gmad.search import GMADError, LevelRule, search
from liqe_dist.models.liqe.config import LIQEConfig
from liqe_dist.models.pmt_iqa.config import PMTIQAConfig
from liqe_dist.models.registry import build_model, load_model
from liqe_dist.models.weights import save_weights
from conftest import photo
from shard_fixtures import pack_csv, write_csv_dataset

CROPS = 2  # crops per image, for speed: recorded by score-shards, used by the calibration too


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Two tiny models of the two families (random weights); a corpus of 16 images scored by them;
    a labelled set of 16 other images of the same kind whose MOS (10..90) follows both models'
    ranks of them (random weights agree with no real MOS: a fit onto one would be flat)."""
    root = tmp_path_factory.mktemp("calib")
    torch.manual_seed(0)
    save_weights(build_model(LIQEConfig(name="liqe-tiny")), root / "liqe.safetensors")
    save_weights(build_model(PMTIQAConfig(width=8)), root / "pmt.safetensors")
    models = [ModelSpec("liqe", str(root / "liqe.safetensors")), ModelSpec("pmt", str(root / "pmt.safetensors"))]
    table = write_csv_dataset(root / "raw", n_refs=4, per_ref=4, size=(240, 230))
    with open(table, newline="") as f:
        rows = list(csv.reader(f))
    files = [str(root / "raw" / r[0]) for r in rows[1:]]
    ranks = [stats.rankdata([s.quality for s in Scorer(load_model(m.checkpoint), default_crops(
        load_model(m.checkpoint), eval_crops=CROPS)).score(files)]) for m in models]
    mos = 10 + 40 * (ranks[0] - 1) / 15 + 40 * (ranks[1] - 1) / 15
    with open(table, "w", newline="") as f:
        csv.writer(f).writerows([rows[0], *([*r[:1], f"{m:.4f}", *r[2:]] for r, m in zip(rows[1:], mos))])
    labelled = pack_csv(table, root / "shards")
    (root / "photos").mkdir()
    for i in range(16):
        photo(240, 230 + 2 * i, seed=100 + i).save(root / "photos" / f"p{i:02d}.png")
    pack_corpus(root / "photos", root / "shards" / "photos", "photos", CorpusConfig(shard_max_count=8, workers=1),
                progress=False)
    score_shards([root / "shards" / "photos"], models, root / "scores", precision="fp32", eval_crops=CROPS,
                 progress=False)
    return root, labelled, (float(mos.min()), float(mos.max()))


def direct_fit(checkpoint, labelled):
    """The calibration's fit made by hand: the evaluator's scores of every image of the set, in key
    order, and scipy's curve_fit from the toolbox's β0."""
    model = load_model(str(checkpoint))
    [ev] = evaluate_shards(model, [labelled], 0, "all", default_crops(model, eval_crops=CROPS), progress=False).values()
    order = np.argsort(np.array(ev.keys, dtype=object), kind="stable")
    score, mos = np.array(ev.score)[order], np.array(ev.mos)[order]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        beta, _ = optimize.curve_fit(logistic4, score, mos, p0=[mos.max(), mos.min(), score.mean(), 0.5], maxfev=20000)
    return score, mos, beta


def test_fits_equal_a_direct_scipy_fit_and_the_search_uses_them(setup, tmp_path):
    root, labelled, (low, high) = setup
    span = high - low
    manifest = json.loads((root / "scores" / "manifest.json").read_text())
    cal = calibrate(labelled, manifest, root / "scores", ["liqe", "pmt"], device="cpu")
    assert cal.images == 16 and (cal.mos_min, cal.mos_max) == pytest.approx((low, high)) and span > 40
    span = cal.mos_max - cal.mos_min  # the MOS as the shards store it (float32)
    assert cal.default_delta == pytest.approx(9 * span / 100) and cal.eval_crops == CROPS
    for name in ("liqe", "pmt"):
        score, mos, beta = direct_fit(root / f"{name}.safetensors", labelled)
        fit = cal.fits[name]
        assert fit.beta0 == pytest.approx((cal.mos_max, cal.mos_min, score.mean(), 0.5))
        assert fit.logistic.beta == pytest.approx(tuple(beta), rel=1e-6, abs=1e-9)
        assert fit.srocc == pytest.approx(stats.spearmanr(score, mos)[0])
        assert fit.plcc == pytest.approx(stats.pearsonr(logistic4(score, *beta), mos)[0], abs=1e-9)
        assert fit.images == 16 and fit.srocc > 0.3
    # the whole command: levels on the mapped scores, Δ = 9 x the MOS span / 100, the fits recorded
    out = tmp_path / "g"
    result, files, _ = run_gmad(root / "scores", ["liqe", "pmt"], LevelRule(levels=3), out,
                                calibrate=labelled, device="cpu")
    corpus = read_scores(root / "scores", ["liqe", "pmt"])
    expected = search(corpus.scores, ["liqe", "pmt"], LevelRule(levels=3, delta=cal.default_delta), corpus.hashes,
                      maps=cal.maps)
    assert [(p.defender, p.level, p.best, p.worst) for p in result.pairs] == [
        (p.defender, p.level, p.best, p.worst) for p in expected.pairs]
    mapped = {m: cal.maps[m](corpus.scores[m]) for m in ("liqe", "pmt")}
    for d, lv in result.levels.items():
        lo, hi = mapped[d].min(), mapped[d].max()
        assert lv.centres == pytest.approx(lo + (np.arange(3) + 0.5) * (hi - lo) / 3)  # MOS units
        assert lv.delta == pytest.approx(9 * span / 100)
    written = json.loads((out / "calibration.json").read_text())
    assert written["models"]["liqe"]["beta"] == pytest.approx(list(cal.fits["liqe"].logistic.beta))
    assert written["shard_set"] == str(labelled.resolve()) and len(written["manifest_sha256"]) == 64
    assert written["images"] == 16 and set(written["models"]["pmt"]) >= {"srocc", "plcc", "sha256", "checkpoint"}
    recorded = yaml.safe_load((out / "config.yaml").read_text())
    assert recorded["delta"] == pytest.approx({"liqe": 9 * span / 100, "pmt": 9 * span / 100})
    assert "calibration MOS span" in recorded["delta_source"] and "MOS" in recorded["levels_on"]
    rows = list(csv.DictReader(open(out / "pairs.csv")))
    assert rows and all(float(r["level_delta"]) == pytest.approx(9 * span / 100, abs=1e-6) for r in rows)
    for r in rows:
        p = result.pairs[int(r["pair"])]
        assert float(r["level_centre"]) == pytest.approx(result.levels[p.defender].centres[p.level], abs=1e-6)
        assert float(r["best_liqe_mapped"]) == pytest.approx(float(mapped["liqe"][p.best]), abs=1e-5)


def test_a_given_logistic_is_applied():
    """A constructed fit: the fitted map of exact logistic data gives back its β; Logistic applies
    f(s) = β2 + (β1 − β2)/(1 + exp(−(s − β3)/|β4|)) (|β4|: the sign of β4 does not matter)."""
    beta = (90.0, 5.0, 3.0, 0.4)
    s = np.linspace(1.0, 5.0, 40)
    mos = beta[1] + (beta[0] - beta[1]) / (1 + np.exp(-(s - beta[2]) / beta[3]))
    assert Logistic(beta)(s) == pytest.approx(mos)
    assert Logistic((90.0, 5.0, 3.0, -0.4))(s) == pytest.approx(mos)
    fit = fit_logistic_map(s, mos, "m")
    assert fit.logistic.beta == pytest.approx(beta, rel=1e-5)
    assert fit.srocc == pytest.approx(1.0) and fit.plcc == pytest.approx(1.0)


def test_a_fit_that_cannot_be_made_names_the_model(monkeypatch):
    s, mos = np.linspace(1, 5, 10), np.linspace(0, 100, 10)
    with pytest.raises(GMADError, match="model flat scores every calibration image alike"):
        fit_logistic_map(np.ones(10), mos, "flat")
    with pytest.raises(GMADError, match="model few: 3 calibration image"):
        fit_logistic_map(s[:3], mos[:3], "few")

    def fail(*args, **kwargs):
        raise RuntimeError("Optimal parameters not found: maxfev exceeded")

    monkeypatch.setattr(optimize, "curve_fit", fail)
    with pytest.raises(GMADError, match=r"the logistic fit of model stubborn onto the calibration MOS failed "
                                        r"\(Optimal parameters not found"):
        fit_logistic_map(s, mos, "stubborn")


def test_refusals_name_the_model_or_the_set(setup, tmp_path):
    from gmad_fixtures import copy_scores

    root, labelled, _ = setup
    changed = copy_scores(root / "scores", tmp_path / "changed", manifest=lambda m: {
        **m, "models": {**m["models"], "pmt": {**m["models"]["pmt"], "sha256": "0" * 64}}})
    with pytest.raises(GMADError, match="model pmt's checkpoint .* no longer matches the scores"):
        run_gmad(changed, ["liqe", "pmt"], LevelRule(), tmp_path / "g1", calibrate=labelled, device="cpu")
    bare = copy_scores(root / "scores", tmp_path / "bare", manifest=lambda m: {
        **m, "models": {"liqe": m["models"]["liqe"], "pmt": {}}})
    with pytest.raises(GMADError, match="model pmt has no checkpoint recorded in"):
        run_gmad(bare, ["liqe", "pmt"], LevelRule(), tmp_path / "g2", calibrate=labelled, device="cpu")
    with pytest.raises(GMADError, match="unlabelled corpus"):
        run_gmad(root / "scores", ["liqe", "pmt"], LevelRule(), tmp_path / "g3",
                 calibrate=root / "shards" / "photos", device="cpu")
    assert not (tmp_path / "g1" / "pairs.csv").exists() and not (tmp_path / "g2" / "pairs.csv").exists()


def test_the_command_line_calibrates(setup, tmp_path):
    from liqe_dist.cli import main

    root, labelled, _ = setup
    out = tmp_path / "g"
    assert main(["gmad", "search", str(root / "scores"), "--models", "pmt", "liqe", "--levels", "2", "--calibrate",
                 str(labelled), "--device", "cpu", "--delta", "2.5", "--no-reuse", "--out", str(out)]) == 0
    recorded = yaml.safe_load((out / "config.yaml").read_text())
    assert recorded["delta"] == {"pmt": 2.5, "liqe": 2.5} and recorded["delta_source"] == "--delta (absolute)"
    assert recorded["calibration"]["images"] == 16 and (out / "calibration.json").is_file()
    assert "calibration.json" in (out / "index.html").read_text()
