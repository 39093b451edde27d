"""The gMAD pair search against hand-computed pairs and a brute-force implementation."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import rankdata

from liqe_dist.gmad.search import GMADError, LevelRule, rank_at, search, sorted_ranks


def test_levels_pairs_and_role_swap_by_hand():
    """d = 0..9, K = 2, no trim, Δ = 0.25 × 9: levels {0, 1, 2} and {7, 8, 9} of d."""
    d = np.arange(10.0)
    a = np.array([5, 1, 9, 0, 0, 0, 0, 3, 3, 1], dtype=float)
    rule = LevelRule(levels=2, trim=0.0, width=0.25)
    res = search({"d": d, "a": a}, ["d", "a"], rule)
    got = [(p.defender, p.attacker, p.level, p.best, p.worst, p.candidates) for p in res.pairs]
    # d defends: level 0 -> a's best 2 (9), worst 1 (1); level 1 -> best 7 (3, tied with 8: first key), worst 9 (1)
    # a defends (range 0..9, levels a <= 2.25 and a >= 6.75): level 0 has 1,3,4,5,6,9 less the used 1, 9
    # -> d's best 6, worst 3; level 1 holds image 2 only, already used: skipped
    assert got == [("d", "a", 0, 2, 1, 3), ("d", "a", 1, 7, 9, 3), ("a", "d", 0, 6, 3, 4)]
    assert res.skipped == [("a", "d", 1, "0 candidate image(s)")]
    ra = (rankdata(a) - 1) / 9
    assert res.pairs[0].gap == pytest.approx(ra[2] - ra[1])
    assert res.pairs[2].centre == 0.0 and res.pairs[1].centre == 9.0


def test_ranks_share_ties_and_span_zero_to_one():
    x = np.sort(np.array([3.0, 1.0, 3.0, 2.0, 5.0, 3.0]))
    expected = (rankdata(x) - 1) / 5
    assert sorted_ranks(x) == pytest.approx(expected)
    assert [rank_at(x, v) for v in x] == pytest.approx(expected)


def brute_force(scores, models, rule, hashes):
    """The definition, one image at a time."""
    n = len(next(iter(scores.values())))
    seen, dup = set(), set()  # images whose hash came earlier are duplicates
    for i, h in enumerate(hashes):
        if h in seen:
            dup.add(i)
        seen.add(h)
    used = set()
    pairs = []
    rank = {m: (rankdata(s) - 1) / (n - 1) for m, s in scores.items()}
    for dfd in models:
        v = rank[dfd] if rule.kind == "quantile" else scores[dfd]
        lo, hi = np.quantile(v, [rule.trim, 1 - rule.trim])
        spacing = (hi - lo) / (rule.levels - 1)
        for att in models:
            if att == dfd:
                continue
            s = scores[att]
            for k in range(rule.levels):
                c = lo + spacing * k
                delta = rule.width * spacing
                cand = [i for i in range(n) if c - delta <= v[i] <= c + delta and i not in used and i not in dup]
                if len(cand) < rule.min_images:
                    continue
                best = min(cand, key=lambda i: (-s[i], i))
                worst = min(cand, key=lambda i: (s[i], i))
                if s[best] == s[worst]:
                    continue
                used |= {best, worst}
                pairs.append((dfd, att, k, best, worst, len(cand)))
    return pairs


@pytest.mark.parametrize("kind", ["uniform", "quantile"])
@pytest.mark.parametrize("seed", range(6))
def test_search_equals_brute_force(kind, seed):
    """Three models with many ties (integer scores), duplicate hashes, trimmed tails, levels that
    run dry as images get used."""
    rng = np.random.default_rng(seed)
    n = 80
    base = rng.normal(size=n)
    scores = {"m1": np.round(base * 3 + rng.normal(size=n), 0),
              "m2": np.round(base * 2 + rng.normal(size=n) * 2, 0),
              "m3": rng.integers(0, 6, size=n).astype(float)}
    hashes = rng.integers(0, 70, size=n).astype(str)  # some images share a hash
    rule = LevelRule(levels=int(rng.integers(3, 8)), kind=kind, trim=float(rng.choice([0.0, 0.05])),
                     width=float(rng.choice([0.2, 0.5])), min_images=int(rng.integers(2, 4)))
    res = search(scores, ["m1", "m2", "m3"], rule, hashes=hashes)
    got = [(p.defender, p.attacker, p.level, p.best, p.worst, p.candidates) for p in res.pairs]
    assert got == brute_force(scores, ["m1", "m2", "m3"], rule, hashes)
    assert len(got) > 5  # the case is not vacuous
    used = [i for p in res.pairs for i in (p.best, p.worst)]
    assert len(used) == len(set(used)) and len({hashes[i] for i in used}) == len(used)


def test_bad_inputs_are_clear_errors():
    d = np.arange(10.0)
    with pytest.raises(GMADError, match=r"no scores for model\(s\) \['c'\]"):
        search({"a": d, "b": d}, ["a", "c"])
    with pytest.raises(GMADError, match="constant"):
        search({"a": np.ones(10), "b": d}, ["a", "b"])
    with pytest.raises(GMADError, match="not finite"):
        search({"a": d, "b": np.r_[d[:-1], np.nan]}, ["a", "b"])
    with pytest.raises(GMADError, match="width"):
        LevelRule(width=0.7)


def test_images_without_a_content_hash_each_count_on_their_own():
    """Null and empty hashes are "unknown", never one shared hash: no image is dropped for them;
    equal real hashes still count once."""
    from liqe_dist.gmad.search import first_of_each_hash

    hashes = np.array([None, None, "", "", "h", "h", float("nan"), "g"], dtype=object)
    assert first_of_each_hash(hashes).tolist() == [True, True, True, True, True, False, True, True]
    d, a = np.arange(8.0), np.array([3, 1, 4, 1, 5, 9, 2, 6], dtype=float)
    rule = LevelRule(levels=2, trim=0.0, width=0.5)
    unknown = np.array([None] * 8, dtype=object)
    assert search({"d": d, "a": a}, ["d", "a"], rule, unknown).pairs == search({"d": d, "a": a}, ["d", "a"], rule).pairs
