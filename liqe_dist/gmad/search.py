"""The gMAD pair search (Ma et al., CVPR 2016 / TPAMI 2020) over a scored corpus.

For every ordered pair of models (defender D, attacker A): D's scores are divided into K levels;
in level k the images D rates alike are those with D's value v within ±Δ of the level's centre
c_k; among them A's best and worst image form the pair (D says they are alike, A says they differ
most). People then judge the pairs; a model whose pairs they tell apart loses.

Levels (``LevelRule``), N images, D's score d:
- ``kind="uniform"``: v = d. The range [lo, hi] is d's ``trim`` and ``1 - trim`` quantiles (the
  extreme tails, often a handful of broken images, do not stretch the levels); the centres are
  K equally spaced points c_k = lo + k (hi - lo) / (K - 1), k = 0..K-1; Δ = ``width`` × the
  spacing (hi - lo) / (K - 1). ``width`` <= 0.5 keeps the levels disjoint.
- ``kind="quantile"``: the same on D's rank instead of its value, v = rank(d) / (N - 1) in [0, 1]
  (ties share their mean rank): levels hold equal numbers of images wherever D's scores crowd.

Model scores are compared only within a model (D's values place the levels, A's values order the
images of a level); the separation a pair shows is reported in A's rank, never as a difference of
raw scores between models, whose scales differ.

Rules: an image used in one pair is not used again (pairs are searched in a fixed order: defenders
and attackers in the order the models are given); images sharing a content hash count as one
(the first by key order is kept), and an image without one (null or empty) is its own; a level
with fewer than ``min_images`` candidates, or whose candidates A scores all alike, gives no pair
and is reported; ties in A's score go to the image that comes first in key order; fewer than two
images, or a model with a non-finite score, is an error.

Cost: one sort of each model's values (O(N log N)), then per attacker and level one
pass over that level's window (O(N) per pair in all): no O(N²) step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np


class GMADError(ValueError):
    """A search that cannot run: a missing model, a defender whose scores are constant."""


@dataclass(frozen=True)
class LevelRule:
    """How a defender's scores become levels (see the module docstring)."""

    levels: int = 6
    kind: Literal["uniform", "quantile"] = "uniform"
    trim: float = 0.01
    width: float = 0.25
    min_images: int = 2

    def __post_init__(self) -> None:
        if self.levels < 2:
            raise GMADError(f"levels must be >= 2, got {self.levels}")
        if self.kind not in ("uniform", "quantile"):
            raise GMADError(f"kind must be uniform or quantile, got {self.kind!r}")
        if not 0 <= self.trim < 0.5:
            raise GMADError(f"trim must be in [0, 0.5), got {self.trim}")
        if not 0 < self.width <= 0.5:
            raise GMADError(f"width must be in (0, 0.5] (a fraction of the level spacing), got {self.width}")
        if self.min_images < 2:
            raise GMADError(f"min_images must be >= 2 (a pair needs two images), got {self.min_images}")


@dataclass(frozen=True)
class Pair:
    """One gMAD pair: in ``defender``'s level ``level`` (centre ``centre`` in its values, or its
    rank for quantile levels), ``attacker`` rates image ``best`` highest and ``worst`` lowest of
    the ``candidates`` images; ``gap`` is their distance in the attacker's rank over the corpus,
    in [0, 1]. ``best``/``worst`` index the corpus arrays."""

    defender: str
    attacker: str
    level: int
    centre: float
    candidates: int
    best: int
    worst: int
    gap: float


@dataclass
class SearchResult:
    pairs: list[Pair] = field(default_factory=list)
    skipped: list[tuple[str, str, int, str]] = field(default_factory=list)  # (defender, attacker, level, why)


def sorted_ranks(sorted_x: np.ndarray) -> np.ndarray:
    """The ranks, scaled to [0, 1], of ascending values ``sorted_x`` (N,); tied values share
    their mean rank."""
    n = len(sorted_x)
    starts = np.flatnonzero(np.r_[True, sorted_x[1:] != sorted_x[:-1]])  # first position of each run
    lengths = np.diff(np.r_[starts, n])
    return np.repeat((starts + (lengths - 1) / 2.0) / max(n - 1, 1), lengths)


def rank_at(sorted_x: np.ndarray, value: float) -> float:
    """The scaled rank of ``value`` among ascending ``sorted_x`` (mean rank of its ties)."""
    left, right = np.searchsorted(sorted_x, value, "left"), np.searchsorted(sorted_x, value, "right")
    return float((left + right - 1) / 2.0 / max(len(sorted_x) - 1, 1))


def extreme(cand: np.ndarray, values: np.ndarray, largest: bool) -> int:
    """The candidate with the largest (smallest) value; of tied ones the first in key order
    (the smallest index), whatever order ``cand`` is in."""
    target = values.max() if largest else values.min()
    return int(cand[values == target].min())


def level_centres(values: np.ndarray, rule: LevelRule) -> tuple[np.ndarray, float]:
    """(the K level centres, Δ) over ``values`` (the defender's values, or its ranks)."""
    lo, hi = np.quantile(values, [rule.trim, 1 - rule.trim])
    if not hi > lo:
        raise GMADError(f"the defender's scores are constant between its {rule.trim:g} and {1 - rule.trim:g} "
                        f"quantiles ({lo:g}): it has no levels")
    spacing = (hi - lo) / (rule.levels - 1)
    return lo + spacing * np.arange(rule.levels), rule.width * spacing


def first_of_each_hash(hashes: np.ndarray) -> np.ndarray:
    """Mask (N,) of the images kept when images sharing a content hash count as one: the first
    in key order (the arrays' order). An image without a hash (None, NaN or "") is its own: it
    is always kept, never merged with another image without one."""
    import pandas as pd

    series = pd.Series(hashes, dtype=object)
    missing = series.isna().to_numpy() | (series == "").to_numpy()
    return ~series.duplicated(keep="first").to_numpy() | missing  # a hash table: O(N), no sort


def search(scores: dict[str, np.ndarray], models: list[str], rule: LevelRule = LevelRule(),
           hashes: np.ndarray | None = None) -> SearchResult:
    """Every ordered pair of ``models`` (defender, attacker), in the order given. ``scores`` maps
    a model name to its scores (N,), the arrays in key order; ``hashes`` (N,) the content hashes."""
    missing = [m for m in models if m not in scores]
    if missing:
        raise GMADError(f"no scores for model(s) {missing}; the scores have {sorted(scores)}")
    if len(set(models)) < 2:
        raise GMADError(f"gMAD needs at least two different models, got {models}")
    n = len(scores[models[0]])
    if n < 2:
        raise GMADError(f"gMAD needs at least two scored images, got {n}")
    # float32 scores stay float32 (what scorers write; sorting them is faster than float64)
    arrays = {m: np.asarray(scores[m]) for m in models}
    arrays = {m: a if a.dtype.kind == "f" else a.astype(np.float64) for m, a in arrays.items()}
    for m, a in arrays.items():
        if a.shape != (n,):
            raise GMADError(f"model {m}: {a.shape[0]} scores, expected {n}")
        if not np.isfinite(a).all():
            raise GMADError(f"model {m}: {int((~np.isfinite(a)).sum())} score(s) are not finite")
    available = first_of_each_hash(hashes) if hashes is not None else np.ones(n, dtype=bool)
    # One sort per model. Not a stable one: a window is a range of values, a set whatever the
    # order of its ties, and ties in the attacker's score are broken by key (extreme()).
    orders = {m: np.argsort(a) for m, a in arrays.items()}
    sorted_scores = {m: arrays[m][orders[m]] for m in models}
    result = SearchResult()
    for defender in models:
        # a level is a run of D's images in sorted order; ranks are monotone in the values
        order = orders[defender]
        sorted_values = sorted_ranks(sorted_scores[defender]) if rule.kind == "quantile" else sorted_scores[defender]
        centres, delta = level_centres(sorted_values, rule)
        lo_idx = np.searchsorted(sorted_values, centres - delta, side="left")
        hi_idx = np.searchsorted(sorted_values, centres + delta, side="right")
        for attacker in models:
            if attacker == defender:
                continue
            a = arrays[attacker]
            for k, (i0, i1) in enumerate(zip(lo_idx, hi_idx)):
                window = order[i0:i1]
                cand = window[available[window]]
                if len(cand) < rule.min_images:
                    result.skipped.append((defender, attacker, k, f"{len(cand)} candidate image(s)"))
                    continue
                scores_c = a[cand]
                best, worst = extreme(cand, scores_c, largest=True), extreme(cand, scores_c, largest=False)
                if a[best] == a[worst]:
                    result.skipped.append((defender, attacker, k, "the attacker scores every candidate alike"))
                    continue
                available[[best, worst]] = False
                gap = rank_at(sorted_scores[attacker], a[best]) - rank_at(sorted_scores[attacker], a[worst])
                result.pairs.append(Pair(defender, attacker, k, float(centres[k]), len(cand), best, worst, gap))
    return result
