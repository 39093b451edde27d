"""From people's answers to the gMAD verdict, as the authors' toolbox defines it
(``data_analysis.m``, ``scale_ml.m`` of "Group MAD Competition (gMAD), Version 1.0", Ma, Wu, Wang,
Duanmu, Yong, Zhang, Li, 2016; the CVPR 2016 / TPAMI 2020 texts could not be checked, only their
abstracts: whether TPAMI changed a definition is not known).

Input: every answer as a signed value x ∈ [−100, 100], positive when the attacker's best image is
preferred (:mod:`liqe_dist.gmad.answers`: buttons best/worst/same = +100/−100/0, or the slider),
from each participant's first showing of a pair; repeated showings only measure consistency.

1. Screening (:mod:`liqe_dist.gmad.screening`, on by default as in the toolbox): outlying values
   and rejected participants are removed before anything else.
2. Per pair (defender j, attacker i, level k): n answers, b of them > 0, w < 0, s = 0; the signed
   preference s̄_ijk = mean(x) / 100 ∈ [−1, 1] (for buttons (b − w)/n; the toolbox's ``nanmean``
   on its −100..100 scale, divided by 100).
3. Cells: aggressiveness a_ijk = s̄_ijk, resistance r_jik = 1 − |s̄_ijk| (the toolbox: 100 − |s̄|):
   a defender resists when people cannot tell its pair apart, whichever way they lean.
4. Levels weigh by the defender's images: w_jk = N_jk / Σ_k' N_jk', N_jk the defender's images in
   level k's window before de-duplication or reuse removal (``level_images`` of pairs.csv), the
   sum over the levels of the (i, j) cell that have answers (the toolbox sums over all six: every
   level has a pair there). Then a_ij = Σ_k w_jk a_ijk (signed, in [−1, 1]) and
   r_ji = Σ_k w_jk r_jik ∈ [0, 1]. ``level_weights="uniform"`` (not the toolbox) averages levels alike.
5. Per model: a_i = mean_{j≠i} a_ij, r_i = mean_{j≠i} r_ij over the cells with answers.
6. Global ranking (:mod:`liqe_dist.gmad.ranking`, ``scale_ml.m``): Thurstone Case V scores of
   C = max(A, 0) (aggressiveness) and of C = R (resistance).
7. Intervals (not in the toolbox): 95 % percentile intervals of a bootstrap over participants
   (``bootstrap`` resamples, seeded) for every pair's s̄, every cell, every model value and every
   ranking score; screening is decided once, on all participants, before resampling. The
   verdict without screening (``unscreened/``) is written without intervals.

Also (not in the toolbox): ``p_attacker = (1 + s̄)/2`` per pair, the 0–1 presentation of s̄ (for
buttons (b + s/2)/n, "same" counting half), which the pairwise labels use as P(A better); and
per participant the consistency of repeated pairs (answered the same way, by sign, or reversed).

Departures from the toolbox are options: ``level_weights="uniform"``, ``screening="bt500"`` or
``"none"``; the bootstrap, the consistency and the labels are additions.

Rules:
- ``--out`` is a folder this command owns (:func:`liqe_dist.outputs.claim_dir`): new, empty or
  marked by an earlier run; never one that is or holds the answers or the pairs file.
- Every text cell of the CSVs (keys, model names, participant ids) is escaped against formula
  injection (:mod:`liqe_dist.tables`); numbers never are.
- The matrices' corner cell is empty, as pandas writes an unnamed index: a model name is never
  empty, so no model column can be taken for it (``pandas.read_csv(path, index_col=0)``).
- Model names are drawn as plain text in the heat maps (matplotlib's mathtext off): ``$x$`` and
  backslashes show as written.
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from liqe_dist.data.pairwise_labels import PairwiseLabel, write_pairwise_labels
from liqe_dist.gmad.answers import SCALE, Answers, category, from_study, read_answers
from liqe_dist.gmad.pairs import PairsFile, read_pairs
from liqe_dist.gmad.ranking import thurstone_scores
from liqe_dist.gmad.screening import screen
from liqe_dist.gmad.search import GMADError
from liqe_dist.outputs import claim_dir
from liqe_dist.provenance import write_config, write_run_record
from liqe_dist.tables import write_csv

log = logging.getLogger(__name__)

KIND = "gmad analyse"  # the owner mark of its output folders
CORNER = ""  # the matrices' top-left cell: no model is named "" (read_pairs refuses it)
VERDICT_FILES = ("pairs_judged.csv", "aggressiveness.csv", "resistance.csv", "cells.csv", "models.csv",
                 "ranking.csv")
UNSCREENED = "unscreened"  # the subfolder of the verdict without screening


class AnalysisOptions(BaseModel):
    """How answers become the verdict (see the module docstring; defaults: the toolbox's)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    level_weights: Literal["images", "uniform"] = Field(
        "images", description="images: w_jk = N_jk / sum N_jk (toolbox); uniform: levels alike")
    screening: Literal["toolbox", "bt500", "none"] = Field(
        "toolbox", description="subject screening rule (screening.py), or none")
    bootstrap: int = Field(1000, ge=0, le=100_000, description="resamples of participants for the intervals (0: none)")
    seed: int = Field(0, ge=0, description="seed of the bootstrap")


@dataclass
class Verdict:
    """One verdict (point values and bootstrap intervals) over a set of kept values.
    Matrices (n, n): ``aggressiveness`` rows attackers, columns defenders; ``resistance`` rows
    defenders, columns attackers; NaN where no answers and on the diagonal. ``*_ci``: (2, ...)
    the 2.5 and 97.5 percentiles (NaN without bootstrap)."""

    preference: np.ndarray           # (pairs,) s̄
    preference_ci: np.ndarray        # (2, pairs)
    judgments: np.ndarray            # (pairs,) n
    counts: np.ndarray               # (pairs, 3) b, w, s
    weights: np.ndarray              # (pairs,) w_jk within its cell (NaN: no answers)
    aggressiveness: np.ndarray
    aggressiveness_ci: np.ndarray
    resistance: np.ndarray
    resistance_ci: np.ndarray
    model_values: np.ndarray         # (2, n): a_i, r_i
    model_values_ci: np.ndarray      # (2, 2, n)
    ranking: np.ndarray              # (2, n): Thurstone scores of max(A, 0) and of R
    ranking_ci: np.ndarray           # (2, 2, n)
    ranking_bounded: tuple[bool, bool]


@dataclass
class StudyAnalysis:
    """Everything ``gmad analyse`` reports: the verdict with screening (``verdict``) and without
    (``unscreened``, None when screening is off), the screening per participant and consistency."""

    models: list[str]
    pairs: PairsFile
    participants: list[str]
    answers: int
    values: np.ndarray               # (participants, pairs) first showings, NaN where none
    verdict: Verdict
    unscreened: Verdict | None
    screening: list[dict]
    consistency: list[dict]
    options: AnalysisOptions


def first_showings(answers: Answers, pairs: PairsFile) -> tuple[list[str], np.ndarray, dict, dict]:
    """(participants, values (participants × pairs, NaN where not judged), first and repeated
    values by (participant, pair))."""
    column = {p.pair: k for k, p in enumerate(pairs.pairs)}
    participants = sorted({a.participant for a in answers.answers})
    row = {who: r for r, who in enumerate(participants)}
    values = np.full((len(participants), len(pairs.pairs)), np.nan)
    first: dict[tuple[str, int], float] = {}
    again: dict[tuple[str, int], float] = {}
    for a in answers.answers:
        key = (a.participant, a.pair)
        if a.repeat:
            again.setdefault(key, a.value)
        elif key not in first:
            first[key] = a.value
            values[row[a.participant], column[a.pair]] = a.value
    return participants, values, first, again


def level_sizes(pairs: PairsFile, rule: str) -> np.ndarray:
    """(pairs,) each pair's N_jk (``images``) or 1 (``uniform``)."""
    if rule == "uniform":
        return np.ones(len(pairs.pairs))
    missing = [p.pair for p in pairs.pairs if p.level_images is None]
    if missing:
        raise GMADError(f"{pairs.path}: no level_images (N_jk, the defender's images per level) for "
                        f"{len(missing)} pair(s), e.g. pair {missing[0]}; the toolbox weighs levels by them: "
                        f"search again with this version of `gmad search`, or analyse with --level-weights uniform")
    return np.array([p.level_images for p in pairs.pairs], dtype=np.float64)


def cell_index(pairs: PairsFile, models: list[str]) -> np.ndarray:
    """(pairs,) the flat index attacker · n + defender of each pair's cell in an (n, n) matrix."""
    index = {m: k for k, m in enumerate(models)}
    return np.array([index[p.attacker] * len(models) + index[p.defender] for p in pairs.pairs])


def cells(means: np.ndarray, sizes: np.ndarray, cell: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """From pair preferences ``means`` (B, pairs) (NaN: no answers) to (A (B, n, n) rows
    attackers, R (B, n, n) rows defenders, the level weights (B, pairs)); NaN where a cell has no
    answers and on the diagonal."""
    has = np.isfinite(means)
    w = np.where(has, sizes, 0.0)
    onehot = np.zeros((len(cell), n * n))
    onehot[np.arange(len(cell)), cell] = 1.0
    total = w @ onehot                                            # (B, n²) Σ_k N_jk over answered levels
    with np.errstate(invalid="ignore", divide="ignore"):
        weights = w / (total @ onehot.T)                          # (B, pairs): w_jk within its cell
        a = (np.where(has, means, 0.0) * weights) @ onehot / (total > 0)
        r = (np.where(has, 1.0 - np.abs(means), 0.0) * weights) @ onehot / (total > 0)
    a = np.where(total > 0, a, np.nan).reshape(-1, n, n)
    r = np.where(total > 0, r, np.nan).reshape(-1, n, n).transpose(0, 2, 1)  # r_ji: rows defenders
    weights = np.where(has, weights, np.nan)
    return a, r, weights


def per_model(matrix: np.ndarray) -> np.ndarray:
    """(B, n): each row model's mean over the other models' columns with answers (NaN: none)."""
    with np.errstate(invalid="ignore"):
        finite = np.isfinite(matrix)
        total = np.where(finite, matrix, 0.0).sum(axis=2)
        return np.where(finite.any(axis=2), total / np.maximum(finite.sum(axis=2), 1), np.nan)


def rankings(a: np.ndarray, r: np.ndarray) -> tuple[np.ndarray, tuple[bool, bool]]:
    """(2, n) Thurstone Case V scores of max(A, 0) and of R, and whether each is a true maximum."""
    sa, ok_a = thurstone_scores(np.maximum(np.nan_to_num(a, nan=0.0), 0.0))
    sr, ok_r = thurstone_scores(np.nan_to_num(r, nan=0.0))
    return np.stack([sa, sr]), (ok_a, ok_r)


def interval(samples: np.ndarray) -> np.ndarray:
    """(2, ...) the 2.5 and 97.5 percentiles over axis 0, NaN where no sample is finite."""
    if len(samples) == 0:
        return np.full((2, *samples.shape[1:]), np.nan)
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "All-NaN slice": a cell unanswered in every resample
        return np.nanpercentile(samples, [2.5, 97.5], axis=0)


def verdict(values: np.ndarray, kept: np.ndarray, sizes: np.ndarray, cell: np.ndarray, n: int,
            options: AnalysisOptions) -> Verdict:
    """The verdict over ``values`` (participants × pairs) where ``kept``."""
    x = np.where(kept, values, 0.0) / SCALE
    m = kept.astype(np.float64)
    judgments = m.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        means = np.where(judgments > 0, x.sum(axis=0) / judgments, np.nan)
    counts = np.stack([(kept & (values > 0)).sum(0), (kept & (values < 0)).sum(0), (kept & (values == 0)).sum(0)], 1)
    a, r, weights = cells(means[None], sizes, cell, n)
    ranking, bounded = rankings(a[0], r[0])

    boot_means = np.empty((0, len(sizes)))
    boot_a = boot_r = np.empty((0, n, n))
    boot_rank = np.empty((0, 2, n))
    if options.bootstrap and len(values):
        rng = np.random.default_rng(options.seed)
        draws = rng.integers(0, len(values), size=(options.bootstrap, len(values)))
        times = np.zeros((options.bootstrap, len(values)))
        np.add.at(times, (np.arange(options.bootstrap)[:, None], draws), 1.0)   # (B, participants)
        with np.errstate(invalid="ignore", divide="ignore"):
            boot_means = (times @ x) / (times @ m)
        boot_a, boot_r, _ = cells(boot_means, sizes, cell, n)
        boot_rank = np.stack([rankings(ba, br)[0] for ba, br in zip(boot_a, boot_r)])
    model_values = np.stack([per_model(a)[0], per_model(r)[0]])
    boot_models = np.stack([per_model(boot_a), per_model(boot_r)], axis=1) if len(boot_a) else np.empty((0, 2, n))
    return Verdict(preference=means, preference_ci=interval(boot_means), judgments=judgments.astype(int),
                   counts=counts, weights=weights[0], aggressiveness=a[0], aggressiveness_ci=interval(boot_a),
                   resistance=r[0], resistance_ci=interval(boot_r), model_values=model_values,
                   model_values_ci=interval(boot_models), ranking=ranking, ranking_ci=interval(boot_rank),
                   ranking_bounded=bounded)


def analyse(pairs: PairsFile, answers: Answers, options: AnalysisOptions = AnalysisOptions()) -> StudyAnalysis:
    """The whole analysis of ``answers`` to ``pairs`` (see the module docstring)."""
    participants, values, first, again = first_showings(answers, pairs)
    sizes = level_sizes(pairs, options.level_weights)
    models = pairs.models
    cell = cell_index(pairs, models)
    judged = np.isfinite(values)
    if options.screening == "none":
        kept, screening_rows = judged, []
    else:
        s = screen(values, options.screening)
        kept = s.kept
        screening_rows = [{"participant": who, "pairs_judged": int(judged[k].sum()), "p": int(s.p[k]),
                           "q": int(s.q[k]), "outliers": int(s.outliers[k].sum()),
                           "values_removed": int((judged[k] & ~s.kept[k]).sum()), "rejected": bool(s.rejected[k])}
                          for k, who in enumerate(participants)]
    main = verdict(values, kept, sizes, cell, len(models), options)
    # without screening: point values only (its intervals would double the run for a side result)
    unscreened = None if options.screening == "none" else verdict(values, judged, sizes, cell, len(models),
                                                                   options.model_copy(update={"bootstrap": 0}))
    return StudyAnalysis(models=models, pairs=pairs, participants=participants, answers=len(answers.answers),
                         values=values, verdict=main, unscreened=unscreened, screening=screening_rows,
                         consistency=consistency_rows(first, again), options=options)


def consistency_rows(first: dict[tuple[str, int], float], again: dict[tuple[str, int], float]) -> list[dict]:
    """Per participant: repeated pairs answered twice, how many the same way (by sign: best,
    worst or same), how many reversed (best one time, worst the other)."""
    per: dict[str, list[int]] = {}
    for (who, pair), second in again.items():
        if (who, pair) not in first:
            continue
        one, two = category(first[who, pair]), category(second)
        stats = per.setdefault(who, [0, 0, 0])
        stats[0] += 1
        stats[1] += one == two
        stats[2] += {one, two} == {"best", "worst"}
    rows = [{"participant": who, "repeated": n, "agree": agree, "agreement": _round(agree / n),
             "reversed": rev} for who, (n, agree, rev) in sorted(per.items())]
    if rows:
        n, agree, rev = (sum(r[k] for r in rows) for k in ("repeated", "agree", "reversed"))
        rows.append({"participant": "all", "repeated": n, "agree": agree, "agreement": _round(agree / n),
                     "reversed": rev})
    return rows


def _round(x: float) -> float:
    return round(float(x), 6) if math.isfinite(x) else float("nan")


# --- the files ----------------------------------------------------------------------------------

def pair_rows(analysis: StudyAnalysis, v: Verdict) -> list[dict]:
    rows = []
    for k, p in enumerate(analysis.pairs.pairs):
        s = v.preference[k]
        rows.append({"pair": p.pair, "defender": p.defender, "attacker": p.attacker, "level": p.level,
                     "best_key": p.keys["best"], "worst_key": p.keys["worst"], "judgments": int(v.judgments[k]),
                     "prefer_best": int(v.counts[k, 0]), "prefer_worst": int(v.counts[k, 1]),
                     "same": int(v.counts[k, 2]), "preference": _round(s),
                     "preference_low": _round(v.preference_ci[0, k]), "preference_high": _round(v.preference_ci[1, k]),
                     "resistance": _round(1 - abs(s)), "p_attacker": _round((1 + s) / 2),
                     "level_images": "" if p.level_images is None else p.level_images,
                     "level_weight": _round(v.weights[k])})
    return rows


def cell_rows(models: list[str], v: Verdict) -> list[dict]:
    """One row per (attacker, defender): a_ij and r_ji with their intervals."""
    rows = []
    for i, att in enumerate(models):
        for j, dfd in enumerate(models):
            if i != j:
                rows.append({"attacker": att, "defender": dfd, "aggressiveness": _round(v.aggressiveness[i, j]),
                             "aggressiveness_low": _round(v.aggressiveness_ci[0, i, j]),
                             "aggressiveness_high": _round(v.aggressiveness_ci[1, i, j]),
                             "resistance": _round(v.resistance[j, i]),
                             "resistance_low": _round(v.resistance_ci[0, j, i]),
                             "resistance_high": _round(v.resistance_ci[1, j, i])})
    return rows


def model_rows(analysis: StudyAnalysis, v: Verdict) -> list[dict]:
    index = {m: k for k, m in enumerate(analysis.models)}
    levels_a = {m: 0 for m in analysis.models}
    levels_d = dict(levels_a)
    for k, p in enumerate(analysis.pairs.pairs):
        if v.judgments[k]:
            levels_a[p.attacker] += 1
            levels_d[p.defender] += 1
    return [{"model": m, "aggressiveness": _round(v.model_values[0, k]),
             "aggressiveness_low": _round(v.model_values_ci[0, 0, k]),
             "aggressiveness_high": _round(v.model_values_ci[1, 0, k]),
             "resistance": _round(v.model_values[1, k]), "resistance_low": _round(v.model_values_ci[0, 1, k]),
             "resistance_high": _round(v.model_values_ci[1, 1, k]),
             "levels_attacking": levels_a[m], "levels_defending": levels_d[m]} for m, k in index.items()]


def ranking_rows(models: list[str], v: Verdict) -> list[dict]:
    """Per model: both Thurstone scores with intervals and its place (1 = best) by each."""
    places = [{m: int(r) + 1 for m, r in zip(models, np.argsort(np.argsort(-v.ranking[c], kind="stable")))}
              for c in range(2)]
    rows = []
    for k, m in enumerate(models):
        row = {"model": m}
        for c, name in enumerate(("aggressiveness", "resistance")):
            row |= {f"{name}_score": _round(v.ranking[c, k]), f"{name}_low": _round(v.ranking_ci[0, c, k]),
                    f"{name}_high": _round(v.ranking_ci[1, c, k]), f"{name}_place": places[c][m],
                    f"{name}_bounded": v.ranking_bounded[c]}
        rows.append(row)
    return rows


def pairwise_labels(analysis: StudyAnalysis) -> list[PairwiseLabel]:
    """The judged pairs as labels: A = the attacker's best image, p = P(A looks better) = (1 + s̄)/2."""
    v = analysis.verdict
    labels = []
    for k, p in enumerate(analysis.pairs.pairs):
        if not v.judgments[k]:
            continue
        labels.append(PairwiseLabel(p.keys["best"], p.sources["best"], p.keys["worst"], p.sources["worst"],
                                    _round((1 + v.preference[k]) / 2), int(v.judgments[k]),
                                    {"pair": str(p.pair), "defender": p.defender, "attacker": p.attacker,
                                     "level": str(p.level)}))
    return labels


def matrix_rows(matrix: np.ndarray, models: list[str]) -> list[dict]:
    """One dict per row model: the :data:`CORNER` column holds its name, each model's column its
    value ("" where there is none)."""
    return [{CORNER: m, **{n: ("" if not np.isfinite(matrix[i, j]) else _round(float(matrix[i, j])))
                           for j, n in enumerate(models)}} for i, m in enumerate(models)]


def heat_map(matrix: np.ndarray, models: list[str], title: str, rows: str, cols: str, path: Path,
             signed: bool = False) -> None:
    """The matrix as a heat map: −1..1 on a diverging scale (``signed``) or 0..1."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    size = 1.2 + 0.9 * len(models)
    fig, ax = plt.subplots(figsize=(size + 1.5, size))
    masked = np.ma.masked_invalid(matrix)
    cmap = plt.get_cmap("RdBu_r" if signed else "viridis").with_extremes(bad="#dddddd")
    low = -1.0 if signed else 0.0
    im = ax.imshow(masked, vmin=low, vmax=1.0, cmap=cmap)
    # model names are text, not mathtext: "$x$" or a backslash would be parsed (and can fail to)
    ax.set_xticks(range(len(models)), models, rotation=30, ha="right", parse_math=False)
    ax.set_yticks(range(len(models)), models, parse_math=False)
    ax.set_xlabel(cols)
    ax.set_ylabel(rows)
    ax.set_title(title)
    for i in range(len(models)):
        for j in range(len(models)):
            v = matrix[i, j]
            text = "–" if i == j else ("n/a" if not np.isfinite(v) else f"{v:.2f}")
            dark = np.isfinite(v) and (abs(v) > 0.6 if signed else v <= 0.6)
            ax.text(j, i, text, ha="center", va="center", color="white" if dark else "black")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def format_matrix(matrix: np.ndarray, models: list[str], title: str) -> str:
    width = max(9, *(len(m) + 2 for m in models))
    lines = [title, "".ljust(width) + "".join(m.rjust(width) for m in models)]
    for i, m in enumerate(models):
        cells_ = ["-" if i == j else ("n/a" if not np.isfinite(matrix[i, j]) else f"{matrix[i, j]:.3f}")
                  for j in range(len(models))]
        lines.append(m.ljust(width) + "".join(c.rjust(width) for c in cells_))
    return "\n".join(lines)


def write_verdict(folder: Path, analysis: StudyAnalysis, v: Verdict) -> None:
    """The verdict's files (:data:`VERDICT_FILES`) into ``folder``."""
    models = analysis.models
    write_csv(folder / "pairs_judged.csv", pair_rows(analysis, v))
    write_csv(folder / "aggressiveness.csv", matrix_rows(v.aggressiveness, models))
    write_csv(folder / "resistance.csv", matrix_rows(v.resistance, models))
    write_csv(folder / "cells.csv", cell_rows(models, v))
    write_csv(folder / "models.csv", model_rows(analysis, v))
    write_csv(folder / "ranking.csv", ranking_rows(models, v))


def run_analysis(pairs_path: str | Path, out_dir: str | Path, db: str | Path | None = None,
                 answers: str | Path | None = None,
                 options: AnalysisOptions = AnalysisOptions()) -> tuple[StudyAnalysis, str]:
    """Analyse the answers of a study database ``db`` or of an answers CSV ``answers`` (one of
    them) to ``pairs_path``; write the verdict (with screening, and without it in ``unscreened/``),
    screening.csv, consistency.csv, pairwise_labels.csv and the heat maps into ``out_dir``;
    returns the analysis and a text summary."""
    if (db is None) == (answers is None):
        raise GMADError("give the answers either as a study database (--db) or as an answers CSV (--answers)")
    pairs = read_pairs(pairs_path, need_images=False)
    source = Path(db if db is not None else answers)
    given = from_study(source, pairs) if db is not None else read_answers(source, pairs)
    analysis = analyse(pairs, given, options)
    out = claim_dir(out_dir, KIND, [source, pairs_path],  # a folder analysed before marks: its own files
                    legacy=lambda p: all((p / f).is_file() for f in ("aggressiveness.csv", "resistance.csv")))
    write_config(out, {"pairs": str(Path(pairs_path).resolve()),
                       ("db" if db is not None else "answers"): str(source.resolve()), **options.model_dump()})
    write_run_record(out, participants=len(analysis.participants), judgments=analysis.answers)
    v = analysis.verdict
    write_verdict(out, analysis, v)
    if analysis.unscreened is not None:
        (out / UNSCREENED).mkdir(exist_ok=True)
        write_verdict(out / UNSCREENED, analysis, analysis.unscreened)
    write_csv(out / "screening.csv", analysis.screening,
              ["participant", "pairs_judged", "p", "q", "outliers", "values_removed", "rejected"])
    write_csv(out / "consistency.csv", analysis.consistency or
              [{"participant": "all", "repeated": 0, "agree": 0, "agreement": float("nan"), "reversed": 0}])
    write_pairwise_labels(out / "pairwise_labels.csv", pairwise_labels(analysis))
    models = analysis.models
    heat_map(v.aggressiveness, models, "aggressiveness a_ij (signed)", "attacker i", "defender j",
             out / "aggressiveness.png", signed=True)
    heat_map(v.resistance, models, "resistance r_ij", "defender i", "attacker j", out / "resistance.png")
    return analysis, summary_text(analysis, out)


def summary_text(analysis: StudyAnalysis, out: Path) -> str:
    v, models, o = analysis.verdict, analysis.models, analysis.options
    judged = int((v.judgments > 0).sum())
    rejected = [r["participant"] for r in analysis.screening if r["rejected"]]
    removed = sum(r["values_removed"] for r in analysis.screening)
    lines = [f"{len(analysis.participants)} participants, {analysis.answers} answers; {judged} of "
             f"{len(analysis.pairs.pairs)} pairs judged; levels weighted by "
             f"{'the defender’s images (N_jk)' if o.level_weights == 'images' else 'one each (uniform)'}",
             ("screening: off" if o.screening == "none" else
              f"screening ({o.screening}): {len(rejected)} participant(s) rejected"
              f"{' (' + ', '.join(rejected) + ')' if rejected else ''}, {removed} value(s) removed; "
              f"without screening in {UNSCREENED}/"),
             format_matrix(v.aggressiveness, models, "aggressiveness, signed -1..1 (rows: attacker, columns: defender)"),
             format_matrix(v.resistance, models, "resistance 0..1 (rows: defender, columns: attacker)"),
             "model".ljust(16) + "aggressiveness".rjust(16) + "resistance".rjust(12) + "  Thurstone score (a, r)"]
    for k, m in enumerate(models):
        a, r = v.model_values[:, k]
        lines.append(m.ljust(16) + f"{a:.3f}".rjust(16) + f"{r:.3f}".rjust(12) +
                     f"  {v.ranking[0, k]:+.3f}, {v.ranking[1, k]:+.3f}")
    if not all(v.ranking_bounded):
        lines.append("note: some model never wins (or never loses) by "
                     + " and ".join(n for n, ok in zip(("aggressiveness", "resistance"), v.ranking_bounded) if not ok)
                     + ": its Thurstone score has no finite maximum and stops at the bound")
    if o.bootstrap:
        lines.append(f"95% intervals: bootstrap over participants, {o.bootstrap} resamples (seed {o.seed}), in the CSVs")
    overall = next((r for r in analysis.consistency if r["participant"] == "all"), None)
    lines.append("consistency: no repeated pairs answered twice yet" if overall is None else
                 f"consistency: {overall['agree']} of {overall['repeated']} repeated pairs answered the same "
                 f"({overall['agreement']:.0%}), {overall['reversed']} reversed")
    lines.append(f"written to {out}")
    return "\n".join(lines)
