#!/usr/bin/env python
"""gMAD benchmark, the pair search so far: time and peak memory of ``liqe_dist.gmad.search`` over
N synthetic images scored by M correlated models (every ordered pair of models, K levels),
against the sort that bounds it (one ``np.argsort`` per model, measured in the same run).

    bash launch/bench.sh gmad [--sizes 1e5,1e6,1e7] [--models 3] [--levels 8] [--kind uniform]
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np

from liqe_dist.gmad.search import LevelRule, search
from liqe_dist.hardware import describe


def corpus(n: int, models: int, seed: int = 0) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Scores (float32, as scorers write them) of correlated models and 64-bit content hashes
    with ~1 % duplicates."""
    rng = np.random.default_rng(seed)
    base = rng.normal(size=n).astype(np.float32)
    scores = {f"model{i}": base + rng.normal(size=n).astype(np.float32) * (0.3 + 0.3 * i) for i in range(models)}
    hashes = rng.integers(0, 2**63, size=n, dtype=np.int64)
    dup = rng.random(n) < 0.01
    hashes[dup] = hashes[rng.integers(0, n, size=int(dup.sum()))]
    return scores, hashes


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="1e5,1e6,1e7")
    p.add_argument("--models", type=int, default=3)
    p.add_argument("--levels", type=int, default=8)
    p.add_argument("--kind", choices=["uniform", "quantile"], default="uniform")
    args = p.parse_args()
    rule = LevelRule(levels=args.levels, kind=args.kind)
    print(f"# gMAD pair search: {args.models} models ({args.models * (args.models - 1)} ordered pairs), "
          f"{args.levels} {args.kind} levels; {describe()}")
    print(f"{'images':>12} {'search s':>9} {'argsort s':>9} {'ratio':>6} {'pairs':>6} {'peak RSS MB':>12}")
    for n in (int(float(s)) for s in args.sizes.split(",")):
        scores, hashes = corpus(n, args.models)
        t0 = time.perf_counter()
        for a in scores.values():
            np.argsort(a)
        sort_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        result = search(scores, list(scores), rule, hashes=hashes)
        search_s = time.perf_counter() - t0
        print(f"{n:>12,} {search_s:>9.2f} {sort_s:>9.2f} {search_s / sort_s:>6.2f} {len(result.pairs):>6} "
              f"{peak_rss_mb():>12.0f}")


if __name__ == "__main__":
    main()
