"""`liqe-dist gmad analyse` on a hand-made judgment table: per-pair counts, probabilities and
Wilson intervals, the aggressiveness and resistance matrices and per-model values, consistency on
repeated pairs, the pairwise-label export (read back), heat maps; a wrong pairs file is refused."""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from liqe_dist.data.pairwise_labels import read_pairwise_labels
from liqe_dist.gmad.analyse import AnalysisOptions, analyse
from liqe_dist.gmad.answers import Answer, Answers, from_study, read_answers, write_answers
from liqe_dist.gmad.pairs import read_pairs
from liqe_dist.gmad.study_db import StudyDB, StudySettings

# pair: (defender, attacker, level, N_jk: the defender's images in the level)
PAIRS = {0: ("a", "b", 0, 30), 1: ("a", "b", 1, 10), 2: ("b", "a", 0, 7), 3: ("a", "c", 0, 30), 4: ("c", "b", 0, 12)}
# first answers of participants p1..p4, in the pair's terms (the attacker's best / worst / same)
FIRST = {0: ("best", "best", "same", "worst"),    # s = (2 - 1) / 4 = 0.25
         1: ("best", "best", "best", "best"),     # s = 1
         2: ("worst", "same", "same", "worst"),   # s = -2 / 4 = -0.5
         3: ("same", "same", "same", "same"),     # s = 0
         4: ("best", "best", "best", "worst")}    # s = 0.5
S = {0: 0.25, 1: 1.0, 2: -0.5, 3: 0.0, 4: 0.5}
P = {k: (1 + s) / 2 for k, s in S.items()}        # the 0..1 presentation: 0.625, 1, 0.25, 0.5, 0.75
FLIP = {"best": "worst", "worst": "best", "same": "best"}
NAN = float("nan")
# hand-computed, levels weighted by N_jk: a_ij (attacker i, defender j) = sum_k w_jk s_ijk
A_BA = (30 * 0.25 + 10 * 1.0) / 40                # b attacks a over a's levels 0 (N 30) and 1 (N 10): 0.4375
AGGRESSIVENESS = [[NAN, -0.5, NAN],               # a attacks b: pair 2
                  [A_BA, NAN, 0.5],               # b attacks a: pairs 0, 1; b attacks c: pair 4
                  [0.0, NAN, NAN]]                # c attacks a: pair 3
R_AB = (30 * (1 - 0.25) + 10 * (1 - 1.0)) / 40    # a resists b: 0.5625
RESISTANCE = [[NAN, R_AB, 1.0],                   # r_ji = sum_k w_jk (1 - |s_ijk|); rows defenders
              [1 - 0.5, NAN, NAN],
              [NAN, 1 - 0.5, NAN]]
MODELS = {"a": (-0.5, (R_AB + 1.0) / 2), "b": ((A_BA + 0.5) / 2, 0.5), "c": (0.0, 0.5)}
UNIFORM_A_BA = (0.25 + 1.0) / 2                   # --level-weights uniform: levels alike


@pytest.fixture
def study(tmp_path):
    """pairs.csv of PAIRS and a study database in which p1..p4 answered every trial: first showings
    as FIRST says; repeats: p2 flipped (best <-> worst, same -> best), the others the same again."""
    return make_study(tmp_path)


def make_study(tmp_path, names: dict[str, str] | None = None, key_prefix: str = ""):
    """The study of the fixture ``study``, its models renamed by ``names`` and its keys prefixed."""
    names = names or {}
    rows = ["pair,defender,attacker,level,level_images,best_key,worst_key,best_source,worst_source"]
    rows += [f"{k},{names.get(d, d)},{names.get(a, a)},{lvl},{n},{key_prefix}k{k}b,{key_prefix}k{k}w,"
             f"img/{k}b.png,img/{k}w.png" for k, (d, a, lvl, n) in PAIRS.items()]
    (tmp_path / "pairs.csv").write_text("\n".join(rows) + "\n")
    pairs = read_pairs(tmp_path / "pairs.csv", need_images=False)
    db = StudyDB(tmp_path / "study.sqlite", pairs, StudySettings(repeat_fraction=0.4, repeat_gap=1, seed=5))
    repeated = {}
    for who in range(4):
        name = f"p{who + 1}"
        db.register(name)
        repeated[name] = []
        while (trial := db.next_trial(name)) is not None:
            first = FIRST[trial.pair][who]
            if trial.repeat:
                repeated[name].append(trial.pair)
                chosen = FLIP[first] if name == "p2" else first
            else:
                chosen = first
            answer = "same" if chosen == "same" else ("left" if trial.left == chosen else "right")
            db.answer(name, trial.position, answer, response_ms=500)
    return tmp_path, repeated


def run_analyse(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "liqe_dist.cli", "gmad", "analyse", *args],
                          capture_output=True, text=True, timeout=120)


def number(text: str) -> float:
    return NAN if text in ("", "nan") else float(text)


def test_analysis_gives_the_hand_computed_matrices(study):
    root, repeated = study
    if any(len(r) != 2 for r in repeated.values()):
        pytest.fail(f"the fixture expects 2 repeats each, got {repeated}")
    out = root / "out"
    proc = run_analyse(str(root / "pairs.csv"), "--db", str(root / "study.sqlite"), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    run = json.loads((out / "run.json").read_text())["runs"][-1]
    config = (out / "config.yaml").read_text()
    assert run["participants"] == 4 and "level_weights: images" in config and "screening: toolbox" in config

    judged = {int(r["pair"]): r for r in csv.DictReader(open(out / "pairs_judged.csv"))}
    for k, answers in FIRST.items():
        r = judged[k]
        assert int(r["judgments"]) == 4                  # repeats are not counted twice
        assert (int(r["prefer_best"]), int(r["prefer_worst"]), int(r["same"])) == \
            tuple(answers.count(x) for x in ("best", "worst", "same"))
        assert float(r["preference"]) == pytest.approx(S[k]) and float(r["p_attacker"]) == pytest.approx(P[k])
        assert float(r["resistance"]) == pytest.approx(1 - abs(S[k]))
        assert float(r["preference_low"]) <= S[k] <= float(r["preference_high"])
    # everyone said "same" / everyone said "best": every resample agrees, the interval is a point
    assert (float(judged[3]["preference_low"]), float(judged[3]["preference_high"])) == (0.0, 0.0)
    assert (float(judged[1]["preference_low"]), float(judged[1]["preference_high"])) == (1.0, 1.0)
    assert [float(judged[k]["level_weight"]) for k in (0, 1, 2)] == pytest.approx([0.75, 0.25, 1.0])

    for name, expected in (("aggressiveness", AGGRESSIVENESS), ("resistance", RESISTANCE)):
        rows = list(csv.DictReader(open(out / f"{name}.csv")))
        got = [[number(r[m]) for m in "abc"] for r in rows]
        assert [r[next(iter(r))] for r in rows] == ["a", "b", "c"]
        np.testing.assert_allclose(got, expected, equal_nan=True)
        img = np.asarray(Image.open(out / f"{name}.png").convert("L"), dtype=np.float32)
        assert img.shape[0] > 200 and img.std() > 20
    models = {r["model"]: (float(r["aggressiveness"]), float(r["resistance"]))
              for r in csv.DictReader(open(out / "models.csv"))}
    assert models.keys() == MODELS.keys()
    for m, values in MODELS.items():
        assert models[m] == pytest.approx(values)

    consistency = {r["participant"]: r for r in csv.DictReader(open(out / "consistency.csv"))}
    for who in ("p1", "p3", "p4"):
        assert (int(consistency[who]["repeated"]), int(consistency[who]["agree"])) == (2, 2)
    flips = [FIRST[k][1] for k in repeated["p2"]]          # p2 flipped: agreement 0; reversals where not 'same'
    assert (int(consistency["p2"]["agree"]), int(consistency["p2"]["reversed"])) == \
        (0, sum(x != "same" for x in flips))
    assert int(consistency["all"]["repeated"]) == 8 and int(consistency["all"]["agree"]) == 6

    labels = read_pairwise_labels(out / "pairwise_labels.csv")
    assert [(lab.key_a, lab.key_b, lab.p_a_better, lab.judgments) for lab in labels] == \
        [(f"k{k}b", f"k{k}w", pytest.approx(P[k]), 4) for k in PAIRS]
    assert labels[0].extra == {"pair": "0", "defender": "a", "attacker": "b", "level": "0"}
    assert "aggressiveness, signed" in proc.stdout and "6 of 8 repeated pairs" in proc.stdout

    # the Thurstone ranking of max(A, 0) and of R, as scale_ml.m: computed from the matrices above
    from liqe_dist.gmad.ranking import thurstone_scores
    ranking = {r["model"]: r for r in csv.DictReader(open(out / "ranking.csv"))}
    a_scores, _ = thurstone_scores(np.maximum(np.nan_to_num(AGGRESSIVENESS), 0))
    r_scores, _ = thurstone_scores(np.nan_to_num(RESISTANCE))
    for k, m in enumerate("abc"):
        assert float(ranking[m]["aggressiveness_score"]) == pytest.approx(a_scores[k], abs=1e-5)
        assert float(ranking[m]["resistance_score"]) == pytest.approx(r_scores[k], abs=1e-5)
    assert int(ranking["b"]["aggressiveness_place"]) == 1        # b wins the most by aggressiveness
    screening = list(csv.DictReader(open(out / "screening.csv")))
    assert [r["participant"] for r in screening] == ["p1", "p2", "p3", "p4"]
    assert not any(r["rejected"] == "True" for r in screening)  # 4 answers a pair: no value can be 2 sigma off
    unscreened = list(csv.DictReader(open(out / "unscreened" / "aggressiveness.csv")))
    assert float(unscreened[1]["a"]) == pytest.approx(A_BA)


@pytest.mark.slow  # 8-19 s of CLI runs: the full suite runs it
def test_uniform_level_weights_and_bad_options(study, tmp_path):
    root, _ = study
    proc = run_analyse(str(root / "pairs.csv"), "--db", str(root / "study.sqlite"), "--out", str(tmp_path / "o"),
                       "--level-weights", "uniform", "--no-screening", "--bootstrap", "0")
    assert proc.returncode == 0, proc.stderr
    rows = list(csv.DictReader(open(tmp_path / "o" / "aggressiveness.csv")))
    assert float(rows[1]["a"]) == pytest.approx(UNIFORM_A_BA)
    judged = list(csv.DictReader(open(tmp_path / "o" / "pairs_judged.csv")))
    assert judged[0]["preference_low"] in ("", "nan")              # no bootstrap: no intervals
    assert not (tmp_path / "o" / "unscreened").exists() and "screening: off" in proc.stdout
    proc = run_analyse(str(root / "pairs.csv"), "--db", str(root / "study.sqlite"), "--bootstrap", "-1")
    assert proc.returncode == 2 and "--bootstrap" in proc.stderr
    proc = run_analyse(str(root / "pairs.csv"), "--db", str(root / "study.sqlite"), "--answers", "x.csv")
    assert proc.returncode == 2 and "not allowed with argument" in proc.stderr
    # a pairs file without N_jk cannot weigh levels as the toolbox does: said, with the way out
    old = root / "old"
    old.mkdir()
    text = (root / "pairs.csv").read_text().splitlines()
    (old / "pairs.csv").write_text("\n".join(",".join(c for k, c in enumerate(line.split(",")) if k != 4)
                                             for line in text) + "\n")
    (old / "answers.csv").write_text("participant,pair,answer\np1,0,best\n")
    proc = run_analyse(str(old / "pairs.csv"), "--answers", str(old / "answers.csv"))
    assert proc.returncode == 2 and "no level_images" in proc.stderr and "--level-weights uniform" in proc.stderr


def test_analysis_refuses_another_pairs_file(study, tmp_path):
    root, _ = study
    other = tmp_path / "other" / "pairs.csv"
    other.parent.mkdir()
    other.write_text((root / "pairs.csv").read_text().replace("k0b", "k0x"))
    proc = run_analyse(str(other), "--db", str(root / "study.sqlite"), "--out", str(tmp_path / "o"))
    assert proc.returncode == 2 and "made for another pairs file" in proc.stderr
    proc = run_analyse(str(root / "pairs.csv"), "--db", str(tmp_path / "missing.sqlite"))
    assert proc.returncode == 2 and "no such study database" in proc.stderr


def test_pairwise_label_files_are_checked(tmp_path):
    bad = tmp_path / "labels.csv"
    bad.write_text("key_a,source_a,key_b,source_b,p_a_better,judgments\nx,x.png,y,y.png,1.5,3\n")
    with pytest.raises(ValueError, match=r"labels.csv, line 2: p_a_better must be in \[0, 1\]"):
        read_pairwise_labels(bad)
    bad.write_text("key_a,key_b,p\nx,y,0.5\n")
    with pytest.raises(ValueError, match="not a pairwise label file"):
        read_pairwise_labels(bad)


@pytest.mark.slow  # 8-19 s of CLI runs: the full suite runs it
def test_out_must_be_a_folder_the_command_owns_apart_from_its_inputs(study, tmp_path, caplog):
    from liqe_dist.cli import main

    root, _ = study
    inputs = ["gmad", "analyse", str(root / "pairs.csv"), "--db", str(root / "study.sqlite")]
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "models.csv").write_text("my own\n")
    assert main([*inputs, "--out", str(mine)]) == 2
    assert "holds files not written" in caplog.text and (mine / "models.csv").read_text() == "my own\n"
    assert [p.name for p in mine.iterdir()] == ["models.csv"]
    caplog.clear()
    assert main([*inputs, "--out", str(root)]) == 2            # the folder of the pairs file and the database
    assert "holds the input" in caplog.text and not (root / "models.csv").exists()
    assert main(inputs) == 0 and main(inputs) == 0              # its own default folder, again
    assert (root / "study_analysis" / "models.csv").exists()


def test_odd_model_names_and_formula_like_keys(tmp_path):
    """Models named ``attacker\\defender``, ``$\\foo$`` (mathtext) and ``=cmd``, keys starting with
    ``-``: the heat maps draw, the matrices keep their rows and columns apart (empty corner), text
    cells are escaped and the pairwise labels read back as they were."""
    names = {"a": "attacker\\defender", "b": "$\\foo$", "c": "=cmd"}
    make_study(tmp_path, names, key_prefix="-")
    out = tmp_path / "out"
    proc = run_analyse(str(tmp_path / "pairs.csv"), "--db", str(tmp_path / "study.sqlite"), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    written = ["attacker\\defender", "$\\foo$", "'=cmd"]
    for name, expected in (("aggressiveness", AGGRESSIVENESS), ("resistance", RESISTANCE)):
        header, *rows = list(csv.reader(open(out / f"{name}.csv", newline="")))
        assert header == ["", *written] and [r[0] for r in rows] == written
        np.testing.assert_allclose([[number(c) for c in r[1:]] for r in rows], expected, equal_nan=True)
        assert Image.open(out / f"{name}.png").size[0] > 200
    judged = {int(r["pair"]): r for r in csv.DictReader(open(out / "pairs_judged.csv", newline=""))}
    assert (judged[4]["defender"], judged[4]["best_key"]) == ("'=cmd", "'-k4b")
    assert [r["model"] for r in csv.DictReader(open(out / "models.csv", newline=""))] == written
    labels = read_pairwise_labels(out / "pairwise_labels.csv")
    assert [(lab.key_a, lab.key_b) for lab in labels] == [(f"-k{k}b", f"-k{k}w") for k in PAIRS]
    assert labels[4].extra["defender"] == "=cmd" and labels[0].p_a_better == pytest.approx(P[0])


def one_cell_pairs(tmp_path, levels: int = 2, sizes=(50, 50)):
    """A pairs file of one cell (defender a, attacker b) over ``levels`` levels of N ``sizes``."""
    rows = ["pair,defender,attacker,level,level_images,best_key,worst_key,best_source,worst_source"]
    rows += [f"{k},a,b,{k},{sizes[k]},k{k}b,k{k}w,{k}b.png,{k}w.png" for k in range(levels)]
    (tmp_path / "pairs.csv").write_text("\n".join(rows) + "\n")
    return read_pairs(tmp_path / "pairs.csv", need_images=False)


def answers_of(per_pair: dict[int, list[float]], path) -> Answers:
    out = [Answer(f"p{who:02d}", pair, value) for pair, values in per_pair.items() for who, value in enumerate(values)]
    return Answers(out, sorted({a.participant for a in out}), path)


def test_the_toolbox_hand_cases_aggressiveness_cancels_resistance_does_not(tmp_path):
    """(18, 2, 0) at one level and (2, 18, 0) at another: a = 0, r = 0.2 (the defender failed
    twice); all 'same': a = 0, r = 1 (the issue's cases; the old r = 1 - a gave 0.5 and 0.5)."""
    pairs = one_cell_pairs(tmp_path)
    split = answers_of({0: [100] * 18 + [-100] * 2, 1: [100] * 2 + [-100] * 18}, tmp_path)
    v = analyse(pairs, split, AnalysisOptions(bootstrap=0)).verdict
    assert v.aggressiveness[1, 0] == pytest.approx(0.0) and v.resistance[0, 1] == pytest.approx(0.2)
    assert list(v.preference) == pytest.approx([0.8, -0.8])
    same = answers_of({0: [0] * 20, 1: [0] * 20}, tmp_path)
    v = analyse(pairs, same, AnalysisOptions(bootstrap=0)).verdict
    assert v.aggressiveness[1, 0] == 0.0 and v.resistance[0, 1] == 1.0
    # levels weigh by N_jk: 3:1 toward the first level
    pairs = one_cell_pairs(tmp_path, sizes=(30, 10))
    v = analyse(pairs, split, AnalysisOptions(bootstrap=0)).verdict
    assert v.aggressiveness[1, 0] == pytest.approx(0.75 * 0.8 - 0.25 * 0.8)
    # slider values: the mean over 100
    v = analyse(pairs, answers_of({0: [40, 60], 1: [-10, 30]}, tmp_path), AnalysisOptions(bootstrap=0)).verdict
    assert list(v.preference) == pytest.approx([0.5, 0.1]) and v.resistance[0, 1] == pytest.approx(0.75 * 0.5 + 0.25 * 0.9)


def test_thurstone_scores_match_the_closed_form_and_a_brute_force_grid():
    from scipy.stats import norm

    from liqe_dist.gmad.ranking import negative_log_likelihood, thurstone_scores

    s, ok = thurstone_scores(np.array([[0, 3.0], [1.0, 0]]))   # Phi(s1 - s2) = 3 / 4
    assert ok and s == pytest.approx([norm.ppf(0.75) / 2, -norm.ppf(0.75) / 2], abs=1e-6)
    c = np.random.default_rng(1).random((3, 3))
    s, ok = thurstone_scores(c)
    grid = np.arange(-2, 2, 0.005)
    x, y = np.meshgrid(grid, grid, indexing="ij")
    nll = np.vectorize(lambda u, w: negative_log_likelihood(np.array([u, w, -u - w]), c / c.sum())[0])(x, y)
    i, j = np.unravel_index(np.argmin(nll), nll.shape)
    assert ok and abs(s.sum()) < 1e-9 and s[:2] == pytest.approx([grid[i], grid[j]], abs=0.006)
    s, ok = thurstone_scores(np.array([[0, 1.0, 1], [0, 0, 1], [0, 0, 0]]))  # c never wins: no maximum
    assert not ok and s[0] > s[1] > s[2]
    with pytest.raises(ValueError, match="clip the signed aggressiveness"):
        thurstone_scores(np.array([[0, -1.0], [1, 0]]))


def reference_screen(x: np.ndarray, rule: str):
    """data_analysis.m's screening written out per pair and per participant (the test's own)."""
    from scipy.stats import kurtosis

    kind = np.zeros(x.shape, dtype=int)   # 1 above, -1 below
    normal = np.zeros(x.shape[1], dtype=bool)
    for k in range(x.shape[1]):
        col = x[:, k]
        ok = np.isfinite(col)
        v = col[ok]
        if len(v) < 2:
            continue
        beta = kurtosis(v, fisher=False, bias=True) if v.std() > 0 else 0.0
        normal[k] = 2 <= beta <= 4
        limit = (2 if normal[k] else np.sqrt(20)) * v.std(ddof=1)
        kind[ok, k] = np.where(v - v.mean() > limit, 1, np.where(v - v.mean() < -limit, -1, 0))
    out = kind != 0
    if rule == "toolbox":
        p, q = (out & normal).sum(1), (out & ~normal).sum(1)
    else:
        p, q = (kind == 1).sum(1), (kind == -1).sum(1)
    rated = np.isfinite(x).sum(1)
    rejected = np.array([(pp + qq > 0.05 * n) and pp + qq > 0 and abs(pp - qq) / (pp + qq) < 0.3
                         for pp, qq, n in zip(p, q, rated)])
    return p, q, rejected


@pytest.mark.parametrize("rule", ["toolbox", "bt500"])
def test_screening_rejects_a_constructed_outlier_and_matches_the_written_out_rule(rule):
    from liqe_dist.gmad.screening import screen

    rng = np.random.default_rng(4)
    n_people, n_pairs = 30, 40
    means = rng.uniform(-20, 20, n_pairs)
    x = np.clip(means + rng.normal(0, 5, (n_people, n_pairs)), -100, 100)
    x[rng.random(x.shape) < 0.1] = np.nan                       # not everyone judged everything
    x[0] = np.clip(means + np.where(np.arange(n_pairs) % 2, 75, -75), -100, 100)  # erratic to both sides
    x[1, :20] = np.clip(means[:20] + 30 * rng.standard_t(1.2, 20), -100, 100)   # heavy tails: both rules' kinds
    s = screen(x, rule)
    p, q, rejected = reference_screen(x, rule)
    assert list(s.p) == list(p) and list(s.q) == list(q) and list(s.rejected) == list(rejected)
    if rule == "bt500":
        assert s.rejected[0] and s.p[0] > 0 and s.q[0] > 0 and not s.rejected[2:].any()
        assert not s.kept[0].any() and s.kept[2:].sum() == np.isfinite(x[2:]).sum()  # only the rejected go
    else:
        assert (s.kept == (np.isfinite(x) & ~s.outliers & ~s.rejected[:, None])).all()


@pytest.mark.slow  # 8-19 s of CLI runs: the full suite runs it
def test_an_answers_csv_gives_the_same_verdict_as_the_database(study, tmp_path):
    root, _ = study
    pairs = read_pairs(root / "pairs.csv", need_images=False)
    from_db = from_study(root / "study.sqlite", pairs)
    write_answers(tmp_path / "answers.csv", from_db)
    back = read_answers(tmp_path / "answers.csv", pairs)
    assert back.answers == from_db.answers
    outs = []
    for flag, source in (("--db", root / "study.sqlite"), ("--answers", tmp_path / "answers.csv")):
        out = tmp_path / flag.strip("-")
        proc = run_analyse(str(root / "pairs.csv"), flag, str(source), "--out", str(out), "--bootstrap", "50")
        assert proc.returncode == 0, proc.stderr
        outs.append(out)
    for name in ("pairs_judged.csv", "aggressiveness.csv", "resistance.csv", "cells.csv", "models.csv",
                 "ranking.csv", "consistency.csv", "screening.csv"):
        assert (outs[0] / name).read_text() == (outs[1] / name).read_text(), name
    # a CSV without the repeat column: later rows of a pair are its repeats
    (tmp_path / "plain.csv").write_text("participant,pair,answer,response_ms\nx,0,best,\nx,0,-40,900\ny,1,35.5,\n")
    plain = read_answers(tmp_path / "plain.csv", pairs)
    assert [(a.participant, a.pair, a.value, a.repeat, a.response_ms) for a in plain.answers] == \
        [("x", 0, 100.0, False, None), ("x", 0, -40.0, True, 900), ("y", 1, 35.5, False, None)]


@pytest.mark.parametrize("body, message", [
    ("participant,pair,answer\nx,99,best\n", "line 2: pair '99' is not a pair number"),
    ("participant,pair,answer\nx,0,better\n", "line 2: answer must be best, worst, same or a number"),
    ("participant,pair,answer\nx,0,150\n", "line 2: answer must be"),
    ("participant,pair,answer\nx,0,nan\n", "line 2: answer must be"),
    ("participant,pair,answer,repeat\nx,0,best,0\nx,0,same,0\n", "line 3: participant 'x' has a first showing"),
    ("participant,pair,answer,repeat\nx,0,best,maybe\n", "line 2: repeat must be 0 or 1"),
    ("participant,pair\nx,0\n", "needs the columns participant,pair,answer"),
    ("participant,pair,answer\n,0,best\n", "line 2: participant must be"),
    ("participant,pair,answer\nx,0\n", "line 2: 2 fields"),
])
def test_malformed_answers_rows_name_the_file_and_line(study, tmp_path, body, message):
    root, _ = study
    (tmp_path / "answers.csv").write_text(body)
    with pytest.raises(ValueError, match=re.escape(message)) as err:
        read_answers(tmp_path / "answers.csv", read_pairs(root / "pairs.csv", need_images=False))
    assert "answers.csv" in str(err.value)
