"""From the study's answers to the gMAD verdict: per-pair preferences, the aggressiveness and
resistance of every model (Ma et al., TPAMI 2020), participant consistency, pairwise labels.

Per pair (defender j, attacker i, level l), from each participant's first showing of it: b answers
prefer the attacker's best image, w its worst, s say "same", n = b + w + s. The probability that
the attacker is right, a "same" counting ``same_weight`` (default 1/2: what an indistinguishable
pair gives in a two-alternative forced choice; 0 makes "same" a plain win of the defender, who
called the two images equal):

    p_ij^l = (b + same_weight · s) / n,   95 % Wilson interval on p with n trials.

Aggressiveness of i attacking j, and resistance of j attacked by i, over the L_ij levels whose
pair has answers:

    a_ij = (1/L_ij) Σ_l p_ij^l          r_ji = (1/L_ij) Σ_l (1 − p_ij^l) = 1 − a_ij

A model's overall aggressiveness a_i = mean_{j≠i} a_ij and resistance r_i = mean_{j≠i} r_ij
(cells without answers left out). Repeated showings are not counted there: they measure each
participant's consistency (the share of repeated pairs answered the same both times, and the share
reversed: best one time, worst the other).

Rules:
- ``--out`` is a folder this command owns (:func:`liqe_dist.outputs.claim_dir`): new, empty or
  marked by an earlier run; never one that is or holds the database or the pairs file.
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
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from liqe_dist.data.pairwise_labels import PairwiseLabel, write_pairwise_labels
from liqe_dist.gmad.pairs import PairsFile, read_pairs
from liqe_dist.gmad.study_db import StudyError, StudyRecords, read_study
from liqe_dist.outputs import claim_dir
from liqe_dist.provenance import write_config, write_run_record
from liqe_dist.tables import write_csv

log = logging.getLogger(__name__)

KIND = "gmad analyse"  # the owner mark of its output folders
CORNER = ""  # the matrices' top-left cell: no model is named "" (read_pairs refuses it)

Z95 = 1.959963984540054


def wilson_interval(p: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion ``p`` observed over ``n`` trials."""
    if n <= 0:
        return float("nan"), float("nan")
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass
class StudyAnalysis:
    """``pairs``: one dict per pair (counts, p, interval); ``aggressiveness`` (attacker × defender)
    and ``resistance`` (defender × attacker), NaN where no answers, NaN diagonal; ``model_rows``:
    overall values per model; ``consistency``: per participant and overall ("all")."""

    models: list[str]
    pairs: list[dict]
    aggressiveness: np.ndarray
    resistance: np.ndarray
    model_rows: list[dict]
    consistency: list[dict]
    participants: int
    judgments: int


def analyse(pairs: PairsFile, records: StudyRecords, same_weight: float = 0.5) -> StudyAnalysis:
    if not 0.0 <= same_weight <= 1.0:
        raise ValueError(f"same_weight must be in [0, 1], got {same_weight}")
    if records.meta.get("pairs_sha256") != pairs.sha256:
        raise StudyError(f"the study database was made for another pairs file than {pairs.path} "
                         f"(sha256 {records.meta.get('pairs_sha256', '?')[:12]}... vs {pairs.sha256[:12]}...)")
    counts = {p.pair: {"best": 0, "worst": 0, "same": 0} for p in pairs.pairs}
    first: dict[tuple[str, int], str] = {}
    again: dict[tuple[str, int], str] = {}
    for j in records.judgments:
        if j["pair"] not in counts:
            raise StudyError(f"the study database holds pair {j['pair']}, which {pairs.path} does not have")
        if j["repeat"]:
            again[j["participant"], j["pair"]] = j["chosen"]
        else:
            first[j["participant"], j["pair"]] = j["chosen"]
            counts[j["pair"]][j["chosen"]] += 1

    rows = []
    for p in pairs.pairs:
        c = counts[p.pair]
        n = c["best"] + c["worst"] + c["same"]
        prob = (c["best"] + same_weight * c["same"]) / n if n else float("nan")
        low, high = wilson_interval(prob, n)
        rows.append({"pair": p.pair, "defender": p.defender, "attacker": p.attacker, "level": p.level,
                     "best_key": p.keys["best"], "worst_key": p.keys["worst"], "judgments": n,
                     "prefer_best": c["best"], "prefer_worst": c["worst"], "same": c["same"],
                     "p_attacker": _round(prob), "ci_low": _round(low), "ci_high": _round(high)})

    models = pairs.models
    index = {m: k for k, m in enumerate(models)}
    per_cell: dict[tuple[int, int], list[float]] = {}
    for r in rows:
        if r["judgments"]:
            per_cell.setdefault((index[r["attacker"]], index[r["defender"]]), []).append(r["p_attacker"])
    aggressiveness = np.full((len(models), len(models)), np.nan)
    for (i, j), ps in per_cell.items():
        aggressiveness[i, j] = float(np.mean(ps))
    resistance = (1.0 - aggressiveness).T   # r_ji = 1 - a_ij

    model_rows = []
    for m, k in index.items():
        off = [x for x in range(len(models)) if x != k]
        a, r = aggressiveness[k, off], resistance[k, off]
        model_rows.append({"model": m,
                           "aggressiveness": _round(float(np.nanmean(a))) if np.isfinite(a).any() else float("nan"),
                           "resistance": _round(float(np.nanmean(r))) if np.isfinite(r).any() else float("nan"),
                           "levels_attacking": sum(len(per_cell.get((k, x), [])) for x in off),
                           "levels_defending": sum(len(per_cell.get((x, k), [])) for x in off)})

    return StudyAnalysis(models=models, pairs=rows, aggressiveness=aggressiveness, resistance=resistance,
                         model_rows=model_rows, consistency=consistency_rows(first, again),
                         participants=len(records.participants), judgments=len(records.judgments))


def consistency_rows(first: dict[tuple[str, int], str], again: dict[tuple[str, int], str]) -> list[dict]:
    """Per participant: repeated pairs answered twice, how many the same way, how many reversed."""
    per: dict[str, list[int]] = {}
    for (who, pair), second in again.items():
        if (who, pair) not in first:
            continue
        one = first[who, pair]
        stats = per.setdefault(who, [0, 0, 0])
        stats[0] += 1
        stats[1] += one == second
        stats[2] += {one, second} == {"best", "worst"}
    rows = [{"participant": who, "repeated": n, "agree": agree, "agreement": _round(agree / n),
             "reversed": rev} for who, (n, agree, rev) in sorted(per.items())]
    if rows:
        n, agree, rev = (sum(r[k] for r in rows) for k in ("repeated", "agree", "reversed"))
        rows.append({"participant": "all", "repeated": n, "agree": agree, "agreement": _round(agree / n),
                     "reversed": rev})
    return rows


def _round(x: float) -> float:
    return round(x, 6) if math.isfinite(x) else float("nan")


def pairwise_labels(pairs: PairsFile, analysis: StudyAnalysis) -> list[PairwiseLabel]:
    """The judged pairs as labels: A = the attacker's best image, p = P(A looks better)."""
    by_id = pairs.by_id()
    labels = []
    for r in analysis.pairs:
        if not r["judgments"]:
            continue
        p = by_id[r["pair"]]
        labels.append(PairwiseLabel(p.keys["best"], p.sources["best"], p.keys["worst"], p.sources["worst"],
                                    r["p_attacker"], r["judgments"],
                                    {"pair": str(p.pair), "defender": p.defender, "attacker": p.attacker,
                                     "level": str(p.level)}))
    return labels


def matrix_rows(matrix: np.ndarray, models: list[str]) -> list[dict]:
    """One dict per row model: the :data:`CORNER` column holds its name, each model's column its
    value ("" where there is none)."""
    return [{CORNER: m, **{n: ("" if not np.isfinite(matrix[i, j]) else _round(float(matrix[i, j])))
                           for j, n in enumerate(models)}} for i, m in enumerate(models)]


def heat_map(matrix: np.ndarray, models: list[str], title: str, rows: str, cols: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    size = 1.2 + 0.9 * len(models)
    fig, ax = plt.subplots(figsize=(size + 1.5, size))
    masked = np.ma.masked_invalid(matrix)
    cmap = plt.get_cmap("viridis").with_extremes(bad="#dddddd")
    im = ax.imshow(masked, vmin=0.0, vmax=1.0, cmap=cmap)
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
            ax.text(j, i, text, ha="center", va="center",
                    color="black" if not np.isfinite(v) or v > 0.6 else "white")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def format_matrix(matrix: np.ndarray, models: list[str], title: str) -> str:
    width = max(9, *(len(m) + 2 for m in models))
    lines = [title, "".ljust(width) + "".join(m.rjust(width) for m in models)]
    for i, m in enumerate(models):
        cells = ["-" if i == j else ("n/a" if not np.isfinite(matrix[i, j]) else f"{matrix[i, j]:.3f}")
                 for j in range(len(models))]
        lines.append(m.ljust(width) + "".join(c.rjust(width) for c in cells))
    return "\n".join(lines)


def run_analysis(db_path: str | Path, pairs_path: str | Path, out_dir: str | Path,
                 same_weight: float = 0.5) -> tuple[StudyAnalysis, str]:
    """Analyse a study and write pairs_judged.csv, aggressiveness.csv/.png, resistance.csv/.png,
    models.csv, consistency.csv and pairwise_labels.csv into ``out_dir``; returns the analysis and
    a text summary."""
    pairs = read_pairs(pairs_path, need_images=False)
    analysis = analyse(pairs, read_study(db_path), same_weight)
    out = claim_dir(out_dir, KIND, [db_path, pairs_path],  # a folder analysed before marks: its own files
                    legacy=lambda p: all((p / f).is_file() for f in ("aggressiveness.csv", "resistance.csv")))
    write_config(out, {"db": str(Path(db_path).resolve()), "pairs": str(Path(pairs_path).resolve()),
                       "same_weight": same_weight})
    write_run_record(out, participants=analysis.participants, judgments=analysis.judgments)
    models = analysis.models
    write_csv(out / "pairs_judged.csv", analysis.pairs)
    write_csv(out / "aggressiveness.csv", matrix_rows(analysis.aggressiveness, models))
    write_csv(out / "resistance.csv", matrix_rows(analysis.resistance, models))
    write_csv(out / "models.csv", analysis.model_rows)
    write_csv(out / "consistency.csv", analysis.consistency or
              [{"participant": "all", "repeated": 0, "agree": 0, "agreement": float("nan"), "reversed": 0}])
    write_pairwise_labels(out / "pairwise_labels.csv", pairwise_labels(pairs, analysis))
    heat_map(analysis.aggressiveness, models, "aggressiveness a_ij", "attacker i", "defender j",
             out / "aggressiveness.png")
    heat_map(analysis.resistance, models, "resistance r_ij", "defender i", "attacker j", out / "resistance.png")

    judged = sum(1 for r in analysis.pairs if r["judgments"])
    lines = [f"{analysis.participants} participants, {analysis.judgments} answers; {judged} of "
             f"{len(analysis.pairs)} pairs judged; a 'same' answer counts {same_weight:g} for the attacker",
             format_matrix(analysis.aggressiveness, models, "aggressiveness (rows: attacker, columns: defender)"),
             format_matrix(analysis.resistance, models, "resistance (rows: defender, columns: attacker)"),
             "model".ljust(16) + "aggressiveness".rjust(16) + "resistance".rjust(12)]
    for r in analysis.model_rows:
        lines.append(r["model"].ljust(16) + f"{r['aggressiveness']:.3f}".rjust(16) + f"{r['resistance']:.3f}".rjust(12))
    overall = next((r for r in analysis.consistency if r["participant"] == "all"), None)
    lines.append("consistency: no repeated pairs answered twice yet" if overall is None else
                 f"consistency: {overall['agree']} of {overall['repeated']} repeated pairs answered the same "
                 f"({overall['agreement']:.0%}), {overall['reversed']} reversed")
    lines.append(f"written to {out}")
    return analysis, "\n".join(lines)
