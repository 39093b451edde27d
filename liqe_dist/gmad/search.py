"""The gMAD pair search (Ma et al., CVPR 2016 / TPAMI 2020) over a scored corpus.

For every ordered pair of models (defender D, attacker A): D's values are divided into K levels;
level k holds the images whose D value v lies in the window of the level's centre c_k (D rates
them alike); among them A's best and worst image form the pair (D says they are alike, A says
they differ most). People then judge the pairs; a model whose pairs they tell apart loses.

The defaults are the definitions of the authors' MATLAB toolbox ("Group MAD Competition (gMAD),
Version 1.0", Ma, Wu, Wang, Duanmu, Yong, Zhang, Li, 2016: ``initialization.m``,
``generate_test_images.m``; see ``shared/references/gmad-toolbox.md``); every departure is an
option, named below beside the formula it changes.

Values v. Without a calibration v = D's raw score. With one (``maps``, :mod:`liqe_dist.gmad.calibrate`,
``gmad search --calibrate``) every model's scores are first mapped onto the calibration set's
MOS by its fitted 4-parameter logistic f(s) = β2 + (β1 − β2) / (1 + exp(−(s − β3)/|β4|)), as the
toolbox maps every model onto LIVE MOS (``initialization.m``: ``nlinfit(sobj, live_mos, ...)``,
β0 = [max(MOS), min(MOS), mean(score), 0.5]); the mapped values are then used throughout: D's
for the levels, A's to pick a level's best and worst image and for the rank gap.

Levels (``LevelRule.levels_rule``), N images, K = ``levels``:

- ``"toolbox"`` (default; ``generate_test_images.m``: ``step = (max_value-min_value)/rank;
  check_points = ((min_value+(step*0.5)):step:(max_value-(step*0.5)))';
  range = [check_points-9, check_points+9]; img_idx = y_hat>range(j,1) & y_hat<range(j,2)``):
  the centres are the midpoints of K equal bins over D's FULL range [min v, max v] (no trimming),
  c_k = min v + (k + 1/2)(max v − min v)/K, k = 0..K−1; level k is the STRICT window
  L_k = {x : c_k − Δ < v(x) < c_k + Δ} (its bounds computed once, as the toolbox's ``range``);
  windows may overlap, and an image may then be in two levels.
  Δ is absolute, in the units of v: ``delta`` (``--delta``) when given. Its default departs from
  the toolbox, whose Δ is an absolute 9 on LIVE MOS: our models' raw scales differ (1-5, or
  anything), so without a calibration Δ = 0.09 × (max v − min v) of the defender, which is the
  toolbox's 9 exactly when its mapped range spans 100 MOS units; with a calibration the default
  is 9 × (max MOS − min MOS)/100 of the calibration set's images: 9 on a 0–100 scale, one Δ for
  every defender as in the toolbox.
- ``"uniform"`` (not the toolbox): the range [lo, hi] is v's ``trim`` and ``1 - trim`` quantiles
  (default 0.01: the extreme tails, often a handful of broken images, do not stretch the
  levels); the centres are K equally spaced points c_k = lo + k (hi − lo)/(K − 1), k = 0..K−1,
  the extremes included; level k holds |v − c_k| ≤ Δ (inclusive), Δ = ``width`` × the spacing
  (hi − lo)/(K − 1) (default 0.25; ``width`` <= 0.5 keeps the levels disjoint).
- ``"quantile"`` (not the toolbox): the same on D's rank instead of its value,
  v = rank(d)/(N − 1) in [0, 1] (ties share their mean rank): levels hold equal numbers of images
  wherever D's scores crowd.

``trim`` and ``width`` belong to uniform and quantile levels, ``delta`` to toolbox levels; a
rule given the other's option is an error naming the flag.

The pair of level k: (argmax_{L_k} y_A, argmin_{L_k} y_A) over the level's candidates; ties in A's
value go to the image first in key order (the toolbox's MATLAB ``max``/``min`` return the first
index). Model scores are compared only within a model (D's values place the levels, A's values
order the images of a level); the separation a pair shows is reported as the *rank gap*, the
distance of its two images in A's ranking of the whole corpus (0..1), never as a difference of
raw scores between models, whose scales differ.

Counts: ``level_images`` N_jk is the number of D's images in level k's window before anything is
removed (the toolbox's level weight w_jk = N_jk / Σ_k' N_jk' counts these); ``candidates`` the
images the pair was chosen among, after the removals below.

Removals:
- Content hash de-duplication (not in the toolbox, which has none; a corpus with duplicates would
  give pairs of two identical images): images sharing a content hash count as one, the first by
  key order; an image without one (null or empty) is its own. Always on.
- Reuse. By default an image may appear in several pairs (as in the toolbox: nothing there stops
  it). With ``reuse=False`` (``--no-reuse``, not the toolbox) an image used in one pair is not
  used again; which pair gets a contested image does not depend on the order the models are
  given: greedily, the (defender, attacker, level) whose current pair has the largest rank gap
  takes its two images first (ties: by defender name, attacker name, then level), then every
  pair that lost an image is searched again among what is left, and so on. Pairs are listed in
  the order of the given models either way.

A level with fewer than ``min_images`` candidates, or whose candidates A scores all alike, gives
no pair and is reported (with the state it is left in: the candidates left after the search);
fewer than two images, a model with a non-finite score, or a defender whose values are constant
(over the whole range, or between the trim quantiles), is an error.

Cost: one sort of each model's values (O(N log N)) and, per defender, one compaction of its sorted
order to the de-duplicated images; then per (defender, attacker) one gather of A's values in D's
order and per level one contiguous pass over the window (max, min and the ties of each): O(N)
per model pair with no Python loop over images, however much the windows overlap (each image is
in at most ⌈2Δ/step⌉ + 1 toolbox windows). ``reuse=False`` adds, per contested pair, one more
pass over that level's window.
"""

from __future__ import annotations

import dataclasses
import heapq
import math
from dataclasses import dataclass, field
from typing import Callable, Literal, Mapping, NamedTuple

import numpy as np

LEVEL_RULES = ("toolbox", "uniform", "quantile")
#: Without a calibration, the toolbox rule's default Δ as a share of the defender's range (the
#: toolbox's 9 over a 100-unit MOS range).
TOOLBOX_DELTA_SHARE = 0.09
#: The toolbox's Δ on a 0-100 MOS scale; with a calibration the default Δ is this × span / 100.
TOOLBOX_DELTA_MOS = 9.0
UNIFORM_TRIM, UNIFORM_WIDTH = 0.01, 0.25


class GMADError(ValueError):
    """A search that cannot run: a missing model, a defender whose scores are constant."""


@dataclass(frozen=True)
class LevelRule:
    """How a defender's values become levels, and whether images are reused (see the module
    docstring). Field ``x_y`` is the command's flag ``--x-y``; errors name the flag.
    ``trim``/``width`` are None for toolbox levels and default to 0.01/0.25 for the others;
    ``delta`` None: the default Δ."""

    levels: int = 6
    levels_rule: Literal["toolbox", "uniform", "quantile"] = "toolbox"
    delta: float | None = None
    trim: float | None = None
    width: float | None = None
    min_images: int = 2
    reuse: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.levels, bool) or not isinstance(self.levels, int) or self.levels < 2:
            raise GMADError(f"--levels must be an integer >= 2, got {self.levels!r}")
        if self.levels_rule not in LEVEL_RULES:
            raise GMADError(f"--levels-rule must be one of {', '.join(LEVEL_RULES)}, got {self.levels_rule!r}")
        if self.levels_rule == "toolbox":
            for flag, value in (("--trim", self.trim), ("--width", self.width)):
                if value is not None:
                    raise GMADError(f"{flag} applies to --levels-rule uniform or quantile; toolbox levels span the "
                                    f"defender's full range, each ±Δ around its centre (--delta)")
            if self.delta is not None and not (math.isfinite(self.delta) and self.delta > 0):
                raise GMADError(f"--delta must be a finite number > 0 (absolute, in the units the levels are "
                                f"formed on), got {self.delta}")
        else:
            if self.delta is not None:
                raise GMADError(f"--delta applies to --levels-rule toolbox; {self.levels_rule} levels are "
                                f"±--width level spacings wide")
            object.__setattr__(self, "trim", UNIFORM_TRIM if self.trim is None else self.trim)
            object.__setattr__(self, "width", UNIFORM_WIDTH if self.width is None else self.width)
            if not 0 <= self.trim < 0.5:
                raise GMADError(f"--trim must be in [0, 0.5), got {self.trim}")
            if not 0 < self.width <= 0.5:
                raise GMADError(f"--width must be in (0, 0.5] (a fraction of the level spacing), got {self.width}")
        if isinstance(self.min_images, bool) or not isinstance(self.min_images, int) or self.min_images < 2:
            raise GMADError(f"--min-images must be an integer >= 2 (a pair needs two images), got {self.min_images!r}")
        if not isinstance(self.reuse, bool):
            raise GMADError(f"reuse must be True or False (--no-reuse), got {self.reuse!r}")

    def describe(self) -> str:
        """The rule in words, for the page and the log."""
        if self.levels_rule == "toolbox":
            delta = "±Δ" if self.delta is None else f"±{self.delta:g}"
            levels = (f"{self.levels} toolbox levels: the midpoints of {self.levels} equal bins over each defender's "
                      f"full range, each the images strictly within {delta} of its centre")
        else:
            levels = (f"{self.levels} {self.levels_rule} levels over each defender's "
                      f"{'values' if self.levels_rule == 'uniform' else 'ranks'} between its {self.trim:g} and "
                      f"{1 - self.trim:g} quantiles, each the images within ±{self.width:g} level spacings of its "
                      f"centre")
        return levels + ("; an image may be in several pairs" if self.reuse else "; an image is in one pair at most")


@dataclass(frozen=True)
class Levels:
    """One defender's levels over the values they are formed on (its raw or mapped scores, or its
    ranks): centres (K,), half-width ``delta``, window bounds (K,) and whether they are strict
    (toolbox: lower < v < upper) or inclusive (lower <= v <= upper); ``images`` (K,): N_jk, the
    defender's images in each window before de-duplication or reuse removal."""

    centres: np.ndarray
    delta: float
    lower: np.ndarray
    upper: np.ndarray
    strict: bool
    images: np.ndarray

    def positions(self, sorted_values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(starts, ends) (K,): each window as the positions [start, end) of ascending ``sorted_values``."""
        lo_side, hi_side = ("right", "left") if self.strict else ("left", "right")
        return (searchsorted_exact(sorted_values, self.lower, lo_side),
                searchsorted_exact(sorted_values, self.upper, hi_side))

    def contains(self, value: float, k: int) -> bool:
        """Whether one value lies in window ``k`` (the definition the windows follow)."""
        if self.strict:
            return bool(self.lower[k] < value < self.upper[k])
        return bool(self.lower[k] <= value <= self.upper[k])


def searchsorted_exact(sorted_values: np.ndarray, bounds: np.ndarray, side: str) -> np.ndarray:
    """``np.searchsorted(sorted_values, bounds, side)`` compared exactly in float64, without
    converting a float32 array (N copies per call): each float64 bound becomes the float32 that
    splits the float32 values alike (for ``right``, counting v <= b, the largest float32 <= b; for
    ``left``, counting v < b, the smallest float32 >= b)."""
    bounds = np.asarray(bounds, dtype=np.float64)
    if sorted_values.dtype != np.float32:
        return np.searchsorted(sorted_values, bounds, side=side)
    near = bounds.astype(np.float32)
    if side == "right":
        near = np.where(near.astype(np.float64) > bounds, np.nextafter(near, np.float32(-np.inf)), near)
    else:
        near = np.where(near.astype(np.float64) < bounds, np.nextafter(near, np.float32(np.inf)), near)
    return np.searchsorted(sorted_values, near.astype(np.float32), side=side)


def level_windows(sorted_values: np.ndarray, rule: LevelRule, name: str = "") -> Levels:
    """The levels of a defender over its ascending values ``sorted_values`` (its scores, mapped or
    not, or its ranks for quantile levels). ``name`` names the defender in errors."""
    who = f"defender {name}: " if name else ""
    v = np.asarray(sorted_values)
    if rule.levels_rule == "toolbox":
        lo, hi = float(v[0]), float(v[-1])
        if not hi > lo:
            raise GMADError(f"{who}the defender's scores are constant ({lo:g}): it has no levels")
        step = (hi - lo) / rule.levels
        centres = lo + (np.arange(rule.levels) + 0.5) * step
        delta = TOOLBOX_DELTA_SHARE * (hi - lo) if rule.delta is None else float(rule.delta)
        strict = True
    else:
        lo, hi = (float(q) for q in np.quantile(v, [rule.trim, 1 - rule.trim]))
        if not hi > lo:
            raise GMADError(f"{who}the defender's scores are constant between its {rule.trim:g} and "
                            f"{1 - rule.trim:g} quantiles ({lo:g}): it has no levels")
        spacing = (hi - lo) / (rule.levels - 1)
        centres = lo + spacing * np.arange(rule.levels)
        delta = rule.width * spacing
        strict = False
    lower, upper = centres - delta, centres + delta
    levels = Levels(centres, float(delta), lower, upper, strict, np.zeros(rule.levels, dtype=np.int64))
    starts, ends = levels.positions(v)
    return dataclasses.replace(levels, images=(ends - starts).astype(np.int64))


@dataclass(frozen=True)
class Pair:
    """One gMAD pair: in ``defender``'s level ``level`` (centre ``centre``, half-width ``delta``,
    in the units the levels are formed on: raw or mapped scores, or ranks for quantile levels),
    ``attacker`` rates image ``best`` highest and ``worst`` lowest of the ``candidates`` images
    (after de-duplication and, with --no-reuse, the images earlier pairs took); ``level_images``
    is N_jk, the defender's images in the window before either removal; ``gap`` is the two
    images' distance in the attacker's rank over the corpus, in [0, 1]. ``best``/``worst`` index
    the corpus arrays."""

    defender: str
    attacker: str
    level: int
    centre: float
    candidates: int
    best: int
    worst: int
    gap: float
    level_images: int
    delta: float


class Skip(NamedTuple):
    """A level that gave no pair, and why (the state it is left in)."""

    defender: str
    attacker: str
    level: int
    reason: str
    level_images: int


@dataclass
class SearchResult:
    pairs: list[Pair] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)
    levels: dict[str, Levels] = field(default_factory=dict)  # defender -> its levels


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


def first_of_each_hash(hashes: np.ndarray) -> np.ndarray:
    """Mask (N,) of the images kept when images sharing a content hash count as one: the first
    in key order (the arrays' order). An image without a hash (None, NaN or "") is its own: it
    is always kept, never merged with another image without one."""
    import pandas as pd

    hashes = np.asarray(hashes)
    if hashes.dtype.kind in "iub":  # numbers: no missing value, and no slow object conversion
        return ~pd.Series(hashes).duplicated(keep="first").to_numpy()
    series = pd.Series(hashes, dtype=object)
    missing = series.isna().to_numpy() | (series == "").to_numpy()
    return ~series.duplicated(keep="first").to_numpy() | missing  # a hash table: O(N), no sort


def _first_at(index: np.ndarray, values: np.ndarray, target) -> int:
    """The smallest of ``index`` where ``values`` equals ``target``."""
    hits = np.flatnonzero(values == target)
    return int(index[hits[0]]) if len(hits) == 1 else int(index[hits].min())


@dataclass
class _Triple:
    """One (defender, attacker, level) during the search: its window in the defender's
    de-duplicated sorted order, and its current pair (None: none)."""

    defender: str
    attacker: str
    level: int
    start: int
    end: int
    best: int = -1
    worst: int = -1
    gap: float = float("nan")
    candidates: int = 0


def search(scores: dict[str, np.ndarray], models: list[str], rule: LevelRule = LevelRule(),
           hashes: np.ndarray | None = None,
           maps: Mapping[str, Callable[[np.ndarray], np.ndarray]] | None = None) -> SearchResult:
    """Every ordered pair of ``models`` (defender, attacker), listed in the order given. ``scores``
    maps a model name to its scores (N,), the arrays in key order; ``hashes`` (N,) the content
    hashes; ``maps`` model -> an increasing map of its scores onto a common scale (the
    calibration's logistic), applied to that model's scores before anything else."""
    missing = [m for m in models if m not in scores]
    if missing:
        raise GMADError(f"no scores for model(s) {missing}; the scores have {sorted(scores)}")
    if len(set(models)) < 2 or len(set(models)) != len(models):
        raise GMADError(f"gMAD needs at least two different models, each named once, got {models}")
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
    for m, f in (maps or {}).items():
        if m in arrays:
            arrays[m] = np.asarray(f(arrays[m].astype(np.float64)), dtype=np.float64)
            if arrays[m].shape != (n,) or not np.isfinite(arrays[m]).all():
                raise GMADError(f"model {m}: its calibration map gives non-finite values")
    available = first_of_each_hash(hashes) if hashes is not None else np.ones(n, dtype=bool)
    # One sort per model. Not a stable one: a window is a range of values, a set whatever the
    # order of its ties, and ties in the attacker's score are broken by key.
    orders = {m: np.argsort(a) for m, a in arrays.items()}
    sorted_scores = {m: arrays[m][orders[m]] for m in models}
    result = SearchResult()
    triples: list[_Triple] = []
    kept_orders: dict[str, np.ndarray] = {}
    for defender in models:
        order = orders[defender]
        values = sorted_ranks(sorted_scores[defender]) if rule.levels_rule == "quantile" else sorted_scores[defender]
        try:
            levels = level_windows(values, rule, defender)
        except GMADError as exc:
            if maps and defender in maps:
                raise GMADError(f"{exc} (on the calibration scale: its logistic fit maps the corpus's scores "
                                "to one value)") from None
            raise
        result.levels[defender] = levels
        keep = available[order]
        compact = not keep.all()
        kept = order[keep] if compact else order                 # D's de-duplicated images, ascending
        starts, ends = levels.positions(values[keep] if compact else values)
        if not rule.reuse:
            kept_orders[defender] = kept
        for attacker in models:
            if attacker == defender:
                continue
            mine = [_Triple(defender, attacker, k, int(s), int(e), candidates=int(e - s))
                    for k, (s, e) in enumerate(zip(starts, ends))]
            triples.extend(mine)
            if not any(t.end - t.start >= rule.min_images for t in mine):
                continue
            in_order = arrays[attacker][kept]                     # A's values in D's order: one gather
            for t in mine:
                if t.candidates < rule.min_images:
                    continue
                segment = in_order[t.start:t.end]
                high, low = segment.max(), segment.min()
                if high == low:
                    continue
                index = kept[t.start:t.end]
                t.best, t.worst = _first_at(index, segment, high), _first_at(index, segment, low)
                t.gap = rank_at(sorted_scores[attacker], high) - rank_at(sorted_scores[attacker], low)
    if not rule.reuse:
        _assign_without_reuse(triples, arrays, sorted_scores, kept_orders, available.copy(), rule)
    for t in triples:  # in the order of the given models, then level
        images = int(result.levels[t.defender].images[t.level])
        if t.best >= 0:
            result.pairs.append(Pair(t.defender, t.attacker, t.level, float(result.levels[t.defender].centres[t.level]),
                                     t.candidates, t.best, t.worst, t.gap, images, result.levels[t.defender].delta))
        else:
            why = (f"{t.candidates} candidate image(s)" if t.candidates < rule.min_images
                   else "the attacker scores every candidate alike")
            result.skipped.append(Skip(t.defender, t.attacker, t.level, why, images))
    return result


def _assign_without_reuse(triples: list[_Triple], arrays: dict[str, np.ndarray], sorted_scores: dict[str, np.ndarray],
                          kept_orders: dict[str, np.ndarray], free: np.ndarray, rule: LevelRule) -> None:
    """Give each image to one pair at most (``--no-reuse``), whatever the order of the models:
    greedily, the open triple with the largest current rank gap (ties: defender name, attacker
    name, level) takes its pair; a triple that lost an image is searched again among the free
    ones. On return each triple holds its final pair (best < 0: none) and its candidates then.

    A triple's rank gap can only shrink as images go (its window's max falls, its min rises), so
    a heap of the gaps as last computed is exact: the top, if its two images are still free, is
    the best current pair (removing other images changes neither its max nor its first-key tie)."""
    heap = [(-t.gap, t.defender, t.attacker, t.level, i) for i, t in enumerate(triples) if t.best >= 0]
    heapq.heapify(heap)
    while heap:
        _, _, _, _, i = heapq.heappop(heap)
        t = triples[i]
        window = kept_orders[t.defender][t.start:t.end]
        cand = window[free[window]]
        t.candidates = len(cand)
        if free[t.best] and free[t.worst]:
            if t.candidates >= rule.min_images:
                free[[t.best, t.worst]] = False
                continue
        elif t.candidates >= rule.min_images:
            a = arrays[t.attacker][cand]
            high, low = a.max(), a.min()
            if high != low:
                t.best, t.worst = _first_at(cand, a, high), _first_at(cand, a, low)
                t.gap = rank_at(sorted_scores[t.attacker], high) - rank_at(sorted_scores[t.attacker], low)
                heapq.heappush(heap, (-t.gap, t.defender, t.attacker, t.level, i))
                continue
        t.best = t.worst = -1  # closed: no pair
    for t in triples:  # what a level without a pair is left with
        if t.best < 0 and t.end > t.start:
            window = kept_orders[t.defender][t.start:t.end]
            t.candidates = int(free[window].sum())
