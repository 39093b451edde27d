"""`liqe-dist gmad analyse` on a hand-made judgment table: per-pair counts, probabilities and
Wilson intervals, the aggressiveness and resistance matrices and per-model values, consistency on
repeated pairs, the pairwise-label export (read back), heat maps; a wrong pairs file is refused."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from liqe_dist.data.pairwise_labels import read_pairwise_labels
from liqe_dist.gmad.analyse import wilson_interval
from liqe_dist.gmad.pairs import read_pairs
from liqe_dist.gmad.study_db import StudyDB, StudySettings

# pair: (defender, attacker, level)
PAIRS = {0: ("a", "b", 0), 1: ("a", "b", 1), 2: ("b", "a", 0), 3: ("a", "c", 0), 4: ("c", "b", 0)}
# first answers of participants p1..p4, in the pair's terms (the attacker's best / worst / same)
FIRST = {0: ("best", "best", "same", "worst"),    # p = (2 + 1/2) / 4 = 0.625
         1: ("best", "best", "best", "best"),     # p = 1
         2: ("worst", "same", "same", "worst"),   # p = (0 + 2/2) / 4 = 0.25
         3: ("same", "same", "same", "same"),     # p = 0.5
         4: ("best", "best", "best", "worst")}    # p = 0.75
P = {0: 0.625, 1: 1.0, 2: 0.25, 3: 0.5, 4: 0.75}
FLIP = {"best": "worst", "worst": "best", "same": "best"}
NAN = float("nan")
# hand-computed: a_ij (attacker i, defender j) = mean p over the (j, i) levels; models a, b, c
AGGRESSIVENESS = [[NAN, 0.25, NAN],               # a attacks b: pair 2
                  [(0.625 + 1.0) / 2, NAN, 0.75],  # b attacks a: pairs 0, 1; b attacks c: pair 4
                  [0.5, NAN, NAN]]                 # c attacks a: pair 3
RESISTANCE = [[NAN, 1 - 0.8125, 1 - 0.5],         # r_ij = 1 - a_ji
              [1 - 0.25, NAN, NAN],
              [NAN, 1 - 0.75, NAN]]
MODELS = {"a": (0.25, (0.1875 + 0.5) / 2), "b": ((0.8125 + 0.75) / 2, 0.75), "c": (0.5, 0.25)}


@pytest.fixture
def study(tmp_path):
    """pairs.csv of PAIRS and a study database in which p1..p4 answered every trial: first showings
    as FIRST says; repeats: p2 flipped (best <-> worst, same -> best), the others the same again."""
    return make_study(tmp_path)


def make_study(tmp_path, names: dict[str, str] | None = None, key_prefix: str = ""):
    """The study of the fixture ``study``, its models renamed by ``names`` and its keys prefixed."""
    names = names or {}
    rows = ["pair,defender,attacker,level,best_key,worst_key,best_source,worst_source"]
    rows += [f"{k},{names.get(d, d)},{names.get(a, a)},{lvl},{key_prefix}k{k}b,{key_prefix}k{k}w,"
             f"img/{k}b.png,img/{k}w.png" for k, (d, a, lvl) in PAIRS.items()]
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


def test_wilson_interval_matches_the_textbook_values():
    assert wilson_interval(0.5, 4) == pytest.approx((0.1500, 0.8500), abs=5e-4)   # 2 of 4
    assert wilson_interval(1.0, 4) == pytest.approx((0.5101, 1.0), abs=5e-4)      # 4 of 4
    assert wilson_interval(0.1, 100) == pytest.approx((0.0552, 0.1744), abs=5e-4)  # 10 of 100
    assert all(math.isnan(x) for x in wilson_interval(0.5, 0))


def test_analysis_gives_the_hand_computed_matrices(study):
    root, repeated = study
    if any(len(r) != 2 for r in repeated.values()):
        pytest.fail(f"the fixture expects 2 repeats each, got {repeated}")
    out = root / "out"
    proc = run_analyse(str(root / "pairs.csv"), "--db", str(root / "study.sqlite"), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    run = json.loads((out / "run.json").read_text())["runs"][-1]
    assert run["participants"] == 4 and "same_weight: 0.5" in (out / "config.yaml").read_text()

    judged = {int(r["pair"]): r for r in csv.DictReader(open(out / "pairs_judged.csv"))}
    for k, answers in FIRST.items():
        r = judged[k]
        assert int(r["judgments"]) == 4                  # repeats are not counted twice
        assert (int(r["prefer_best"]), int(r["prefer_worst"]), int(r["same"])) == \
            tuple(answers.count(x) for x in ("best", "worst", "same"))
        assert float(r["p_attacker"]) == pytest.approx(P[k])
    assert (float(judged[3]["ci_low"]), float(judged[3]["ci_high"])) == pytest.approx((0.15, 0.85), abs=5e-4)
    assert (float(judged[1]["ci_low"]), float(judged[1]["ci_high"])) == pytest.approx((0.5101, 1.0), abs=5e-4)

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
    assert "aggressiveness (rows: attacker" in proc.stdout and "6 of 8 repeated pairs" in proc.stdout


def test_same_weight_zero_makes_same_a_defender_win(study, tmp_path):
    root, _ = study
    proc = run_analyse(str(root / "pairs.csv"), "--db", str(root / "study.sqlite"), "--out", str(tmp_path / "o"),
                       "--same-weight", "0")
    assert proc.returncode == 0, proc.stderr
    judged = {int(r["pair"]): float(r["p_attacker"]) for r in csv.DictReader(open(tmp_path / "o" / "pairs_judged.csv"))}
    assert judged == {0: 0.5, 1: 1.0, 2: 0.0, 3: 0.0, 4: 0.75}   # b / n
    rows = list(csv.DictReader(open(tmp_path / "o" / "aggressiveness.csv")))
    assert float(rows[1]["a"]) == pytest.approx(0.75) and float(rows[2]["a"]) == 0.0
    proc = run_analyse(str(root / "pairs.csv"), "--db", str(root / "study.sqlite"), "--same-weight", "2")
    assert proc.returncode == 2 and "same_weight must be in [0, 1]" in proc.stderr


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
