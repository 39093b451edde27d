"""The gMAD pair search against hand-computed pairs and a brute-force implementation of each
rule (toolbox, uniform, quantile levels; images reused or not)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy.stats import rankdata

from liqe_dist.gmad.calibrate import Logistic
from liqe_dist.gmad.search import GMADError, LevelRule, Skip, level_windows, rank_at, search, sorted_ranks


def summary(res):
    return [(p.defender, p.attacker, p.level, p.best, p.worst, p.candidates) for p in res.pairs]


def test_toolbox_levels_by_hand():
    """Defender values 0..100: centres at the midpoints of 6 bins of 100/6, windows STRICTLY within
    ±9 (the toolbox's 9; here also the default 0.09 x the range): 16 and 34 are not in 25's window."""
    d = np.arange(101.0)
    lv = level_windows(d, LevelRule())
    assert lv.centres == pytest.approx([100 / 12 * (2 * k + 1) for k in range(6)])
    assert lv.centres[1] == 25.0 and lv.delta == pytest.approx(9.0) and lv.strict
    assert lv.images.tolist() == [18, 17, 18, 18, 17, 18]  # 0..17, 17..33 (16 and 34 excluded), 34..50, ...
    assert lv.images.tolist() == level_windows(d, LevelRule(delta=9.0)).images.tolist()
    assert not lv.contains(16.0, 1) and lv.contains(16.5, 1) and not lv.contains(34.0, 1) and lv.contains(17.0, 0)
    # an absolute Δ does not scale with the range; uniform levels keep the old inclusive ±width spacings
    assert level_windows(d * 2, LevelRule(delta=9.0)).images.tolist() == [9, 9, 9, 9, 9, 9]
    uniform = level_windows(d, LevelRule(levels_rule="uniform", trim=0.0))
    assert uniform.centres.tolist() == [0, 20, 40, 60, 80, 100] and uniform.delta == 5.0
    assert uniform.images.tolist() == [6, 11, 11, 11, 11, 6] and not uniform.strict


def test_pairs_with_and_without_reuse_by_hand():
    """d = 0..9, K = 2, uniform levels, no trim, Δ = 0.25 × 9: levels {0, 1, 2} and {7, 8, 9} of d;
    a's levels (range 0..9): a <= 2.25 is images 1, 3, 4, 5, 6, 9; a >= 6.75 is image 2."""
    d = np.arange(10.0)
    a = np.array([5, 1, 9, 0, 0, 0, 0, 3, 3, 1], dtype=float)
    rule = LevelRule(levels=2, levels_rule="uniform", trim=0.0, width=0.25)
    res = search({"d": d, "a": a}, ["d", "a"], rule)
    # reuse (the default): each level on its own; ties go to the first key (7 before 8)
    assert summary(res) == [("d", "a", 0, 2, 1, 3), ("d", "a", 1, 7, 9, 3), ("a", "d", 0, 9, 1, 6)]
    assert res.skipped == [Skip("a", "d", 1, "1 candidate image(s)", 1)]
    ra = (rankdata(a) - 1) / 9
    assert res.pairs[0].gap == pytest.approx(ra[2] - ra[1]) and res.pairs[2].gap == pytest.approx(8 / 9)
    assert res.pairs[0].centre == 0.0 and res.pairs[1].centre == 9.0 and res.pairs[0].delta == 2.25
    # no reuse: the largest gap first (a defends level 0: 8/9) takes 9 and 1; d's level 0 is searched
    # again among 0 and 2, its level 1 among 7 and 8 (a scores them alike); 2 is then used
    res = search({"d": d, "a": a}, ["d", "a"], LevelRule(levels=2, levels_rule="uniform", trim=0.0, reuse=False))
    assert summary(res) == [("d", "a", 0, 2, 0, 2), ("a", "d", 0, 9, 1, 6)]
    assert res.skipped == [Skip("d", "a", 1, "the attacker scores every candidate alike", 3),
                           Skip("a", "d", 1, "0 candidate image(s)", 1)]
    assert res.pairs[0].level_images == 3


def test_level_images_count_before_de_duplication_and_candidates_after():
    d = np.arange(101.0)
    a = np.sin(d)  # distinct values
    hashes = np.array([f"h{i}" for i in range(101)], dtype=object)
    hashes[[18, 19, 20]] = "h17"  # three copies of image 17, inside level 1 (16 < d < 34)
    res = search({"d": d, "a": a}, ["d", "a"], LevelRule(delta=9.0), hashes)
    level1 = next(p for p in res.pairs if (p.defender, p.level) == ("d", 1))
    assert (level1.level_images, level1.candidates) == (17, 14)
    assert {level1.best, level1.worst}.isdisjoint({18, 19, 20})
    level0 = next(p for p in res.pairs if (p.defender, p.level) == ("d", 0))
    assert (level0.level_images, level0.candidates) == (18, 18)  # 0..17 (< 17.33): no copy there


def test_overlapping_windows_with_reuse_put_one_image_in_two_pairs():
    """Δ = 20 with a level spacing of 16.7: image 20 (the attacker's best overall) lies in levels 0
    (-11.7..28.3) and 1 (5..45), and is the best of both; without reuse only one of them has it."""
    d = np.arange(101.0)
    a = np.cos(d)
    a[20] = 10.0
    res = search({"d": d, "a": a}, ["d", "a"], LevelRule(delta=20.0))
    mine = [p for p in res.pairs if p.defender == "d"]
    assert mine[0].best == mine[1].best == 20 and mine[0].level_images == 29 and mine[1].level_images == 39
    res = search({"d": d, "a": a}, ["d", "a"], LevelRule(delta=20.0, reuse=False))
    used = [i for p in res.pairs for i in (p.best, p.worst)]
    assert used.count(20) == 1 and len(used) == len(set(used))


def test_a_calibration_map_places_the_levels_on_mapped_values():
    """A constructed logistic β = (100, 0, 5, 1): the levels are formed on f(d), not d; Δ = 9 is
    absolute on the mapped scale; the pair is picked on the attacker's mapped scores."""
    d = np.linspace(0.0, 10.0, 201)
    a = np.cos(7 * d)
    f = Logistic((100.0, 0.0, 5.0, 1.0))
    mapped = f(d)
    assert mapped[0] == pytest.approx(100 / (1 + np.exp(5))) and mapped[100] == pytest.approx(50.0)
    rule = LevelRule(delta=9.0)
    res = search({"d": d, "a": a}, ["d", "a"], rule, maps={"d": f})
    lo, hi = mapped.min(), mapped.max()
    expected = lo + (np.arange(6) + 0.5) * (hi - lo) / 6
    assert res.levels["d"].centres == pytest.approx(expected)
    assert res.levels["d"].images.tolist() == [int(((mapped > c - 9) & (mapped < c + 9)).sum()) for c in expected]
    assert res.levels["d"].images.tolist() != level_windows(np.sort(d), rule).images.tolist()
    for p in (p for p in res.pairs if p.defender == "d"):
        window = np.flatnonzero((mapped > expected[p.level] - 9) & (mapped < expected[p.level] + 9))
        assert p.centre == pytest.approx(expected[p.level])
        assert p.best == window[np.argmax(a[window])] and p.worst == window[np.argmin(a[window])]
    # a decreasing map reverses the attacker's choice: its best on the mapped scale is its raw worst
    g = Logistic((0.0, 100.0, 0.0, 0.5))
    flipped = search({"d": d, "a": a}, ["d", "a"], rule, maps={"d": f, "a": g})
    plain = search({"d": d, "a": a}, ["d", "a"], rule, maps={"d": f})
    plain = {p.level: p for p in plain.pairs if p.defender == "d"}
    flipped = {p.level: p for p in flipped.pairs if p.defender == "d"}
    assert flipped.keys() == plain.keys() and len(plain) == 6
    assert all((flipped[k].best, flipped[k].worst) == (plain[k].worst, plain[k].best) for k in plain)


def test_ranks_share_ties_and_span_zero_to_one():
    x = np.sort(np.array([3.0, 1.0, 3.0, 2.0, 5.0, 3.0]))
    expected = (rankdata(x) - 1) / 5
    assert sorted_ranks(x) == pytest.approx(expected)
    assert [rank_at(x, v) for v in x] == pytest.approx(expected)


def brute_force(scores, models, rule, hashes):
    """The definitions, one image at a time: (pairs, skipped) as tuples."""
    n = len(next(iter(scores.values())))
    seen, dup = set(), set()  # images whose hash came earlier are duplicates
    for i, h in enumerate(hashes):
        if h in seen:
            dup.add(i)
        seen.add(h)
    rank = {m: (rankdata(s) - 1) / (n - 1) for m, s in scores.items()}
    windows = {}  # (defender, level) -> (centre, the images in the window)
    for dfd in models:
        v = rank[dfd] if rule.levels_rule == "quantile" else scores[dfd]
        for k in range(rule.levels):
            if rule.levels_rule == "toolbox":
                c = v.min() + (k + 0.5) * (v.max() - v.min()) / rule.levels
                delta = 0.09 * (v.max() - v.min()) if rule.delta is None else rule.delta
                inside = [i for i in range(n) if c - delta < v[i] < c + delta]
            else:
                lo, hi = np.quantile(v, [rule.trim, 1 - rule.trim])
                spacing = (hi - lo) / (rule.levels - 1)
                c, delta = lo + spacing * k, rule.width * spacing
                inside = [i for i in range(n) if c - delta <= v[i] <= c + delta]
            windows[dfd, k] = inside
    triples = [(dfd, att, k) for dfd in models for att in models if att != dfd for k in range(rule.levels)]
    used = set()

    def current(t):
        dfd, att, k = t
        s = scores[att]
        cand = [i for i in windows[dfd, k] if i not in dup and i not in used]
        if len(cand) < rule.min_images:
            return cand, None
        best, worst = min(cand, key=lambda i: (-s[i], i)), min(cand, key=lambda i: (s[i], i))
        if s[best] == s[worst]:
            return cand, None
        r = rank[att]
        return cand, (best, worst, r[best] - r[worst])

    chosen = {}
    if rule.reuse:
        for t in triples:
            cand, pair = current(t)
            if pair:
                chosen[t] = (*pair, len(cand))
    else:  # the open triple of largest gap (ties: names, level) takes its pair, until none is left
        open_ = set(triples)
        while True:
            found = [(-pair[2], t, pair, len(cand)) for t in sorted(open_) for cand, pair in [current(t)] if pair]
            if not found:
                break
            _, t, pair, count = min(found)
            chosen[t] = (*pair, count)
            used |= {pair[0], pair[1]}
            open_.remove(t)
    pairs, skipped = [], []
    for t in triples:
        images = len(windows[t[0], t[2]])
        if t in chosen:
            best, worst, _, count = chosen[t]
            pairs.append((*t, best, worst, count, images))
        else:
            cand, _ = current(t)
            why = (f"{len(cand)} candidate image(s)" if len(cand) < rule.min_images
                   else "the attacker scores every candidate alike")
            skipped.append((*t, why, images))
    return pairs, skipped


def random_case(seed: int, n: int = 80):
    """Three models with many ties (integer scores) and duplicate hashes."""
    rng = np.random.default_rng(seed)
    base = rng.normal(size=n)
    scores = {"m1": np.round(base * 3 + rng.normal(size=n), 0),
              "m2": np.round(base * 2 + rng.normal(size=n) * 2, 0),
              "m3": rng.integers(0, 6, size=n).astype(float)}
    hashes = rng.integers(0, 70, size=n).astype(str)  # some images share a hash
    return rng, scores, hashes


def random_rule(rng, levels_rule: str, reuse: bool) -> LevelRule:
    common = {"levels": int(rng.integers(3, 8)), "levels_rule": levels_rule, "min_images": int(rng.integers(2, 4)),
              "reuse": reuse}
    if levels_rule == "toolbox":
        return LevelRule(**common, delta=None if rng.random() < 0.5 else float(rng.choice([1.0, 2.5])))
    return LevelRule(**common, trim=float(rng.choice([0.0, 0.05])), width=float(rng.choice([0.2, 0.5])))


@pytest.mark.parametrize("reuse", [True, False], ids=["reuse", "no-reuse"])
@pytest.mark.parametrize("levels_rule", ["toolbox", "uniform", "quantile"])
@pytest.mark.parametrize("seed", range(6))
def test_search_equals_brute_force(levels_rule, reuse, seed):
    """Many ties, duplicate hashes, trimmed tails or overlapping windows, levels that run dry as
    images get used."""
    rng, scores, hashes = random_case(seed)
    rule = random_rule(rng, levels_rule, reuse)
    res = search(scores, ["m1", "m2", "m3"], rule, hashes=hashes)
    got = [(*t, p.level_images) for t, p in zip(summary(res), res.pairs)]
    pairs, skipped = brute_force(scores, ["m1", "m2", "m3"], rule, hashes)
    assert got == pairs
    assert [tuple(s) for s in res.skipped] == skipped
    assert len(got) > 5  # the case is not vacuous
    used = [i for p in res.pairs for i in (p.best, p.worst)]
    if not reuse:  # one image per content hash, in one pair at most
        assert len({hashes[i] for i in used}) == len(used)


@pytest.mark.parametrize("seed", range(4))
def test_without_reuse_the_pairs_do_not_depend_on_the_order_of_the_models(seed):
    """Every order of --models gives the same pairs (listed in that order); the images are
    contested (with reuse some would be in two pairs)."""
    rng, scores, hashes = random_case(seed, n=120)
    rule = LevelRule(levels=6, reuse=False, delta=None)
    contested = search(scores, ["m1", "m2", "m3"], LevelRule(levels=6), hashes)
    used = [i for p in contested.pairs for i in (p.best, p.worst)]
    assert len(used) > len(set(used))
    results = {}
    for models in itertools.permutations(["m1", "m2", "m3"]):
        res = search(scores, list(models), rule, hashes)
        results[models] = {(p.defender, p.attacker, p.level, p.best, p.worst) for p in res.pairs}
        order = [(models.index(p.defender), models.index(p.attacker), p.level) for p in res.pairs]
        assert order == sorted(order)
    assert len({frozenset(r) for r in results.values()}) == 1
    assert len(next(iter(results.values()))) > 10


def test_bad_inputs_are_clear_errors():
    d = np.arange(10.0)
    with pytest.raises(GMADError, match=r"no scores for model\(s\) \['c'\]"):
        search({"a": d, "b": d}, ["a", "c"])
    with pytest.raises(GMADError, match="defender a: the defender's scores are constant"):
        search({"a": np.ones(10), "b": d}, ["a", "b"])
    with pytest.raises(GMADError, match="constant between"):
        search({"a": np.r_[0.0, np.ones(98), 2.0], "b": np.arange(100.0)}, ["a", "b"],
               LevelRule(levels_rule="uniform", trim=0.05))
    with pytest.raises(GMADError, match="not finite"):
        search({"a": d, "b": np.r_[d[:-1], np.nan]}, ["a", "b"])
    with pytest.raises(GMADError, match="--width must be in"):
        LevelRule(levels_rule="uniform", width=0.7)
    with pytest.raises(GMADError, match="--trim applies to --levels-rule uniform or quantile"):
        LevelRule(trim=0.01)
    with pytest.raises(GMADError, match="--width applies"):
        LevelRule(width=0.25)
    with pytest.raises(GMADError, match="--delta applies to --levels-rule toolbox"):
        LevelRule(levels_rule="quantile", delta=1.0)
    with pytest.raises(GMADError, match="--delta must be a finite number > 0"):
        LevelRule(delta=0.0)
    with pytest.raises(GMADError, match="--levels-rule must be one of"):
        LevelRule(levels_rule="kind")
    with pytest.raises(GMADError, match="--levels must be"):
        LevelRule(levels=1)
    with pytest.raises(GMADError, match="--min-images"):
        LevelRule(min_images=1)
    assert (LevelRule(levels_rule="uniform").trim, LevelRule(levels_rule="uniform").width) == (0.01, 0.25)


def test_images_without_a_content_hash_each_count_on_their_own():
    """Null and empty hashes are "unknown", never one shared hash: no image is dropped for them;
    equal real hashes still count once."""
    from liqe_dist.gmad.search import first_of_each_hash

    hashes = np.array([None, None, "", "", "h", "h", float("nan"), "g"], dtype=object)
    assert first_of_each_hash(hashes).tolist() == [True, True, True, True, True, False, True, True]
    assert first_of_each_hash(np.array([3, 1, 3, 2, 1], dtype=np.int64)).tolist() == [True, True, False, True, False]
    d, a = np.arange(8.0), np.array([3, 1, 4, 1, 5, 9, 2, 6], dtype=float)
    for rule in (LevelRule(levels=2), LevelRule(levels=2, levels_rule="uniform", trim=0.0, width=0.5, reuse=False)):
        unknown = np.array([None] * 8, dtype=object)
        assert search({"d": d, "a": a}, ["d", "a"], rule, unknown).pairs == search({"d": d, "a": a}, ["d", "a"],
                                                                                   rule).pairs


def test_float32_scores_are_windowed_as_their_float64_values():
    """Scorers write float32; the windows compare them with float64 bounds exactly (without
    converting the arrays): the same pairs as the float64 copy, bound-straddling values included."""
    from liqe_dist.gmad.search import searchsorted_exact

    rng = np.random.default_rng(1)
    for _ in range(50):
        v = np.sort(np.round(rng.normal(size=500) * rng.choice([1, 100, 1e-3]), int(rng.integers(0, 4)))
                    .astype(np.float32))
        wide = v.astype(np.float64)
        bounds = np.r_[rng.choice(wide, 20), np.nextafter(wide[:20], np.inf), np.nextafter(wide[:20], -np.inf),
                       rng.normal(size=20) * float(np.ptp(wide))]
        for side in ("left", "right"):
            assert (searchsorted_exact(v, bounds, side) == np.searchsorted(wide, bounds, side)).all()
    _, scores, hashes = random_case(2, n=300)
    narrow = {m: (s / 7).astype(np.float32) for m, s in scores.items()}
    for rule in (LevelRule(), LevelRule(delta=0.3), LevelRule(levels_rule="uniform")):
        a = search(narrow, ["m1", "m2", "m3"], rule, hashes)
        b = search({m: s.astype(np.float64) for m, s in narrow.items()}, ["m1", "m2", "m3"], rule, hashes)
        assert summary(a) == summary(b) and [s.reason for s in a.skipped] == [s.reason for s in b.skipped]
