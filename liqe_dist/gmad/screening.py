"""Subject screening before the gMAD verdict, in the ITU-R BT.500 style the toolbox's
``data_analysis.m`` uses.

Input: the first-showing values X (participants × pairs, NaN where a participant did not judge a
pair; the −100..100 scale). Per pair, over the participants who judged it: mean μ, standard
deviation σ (with N − 1, MATLAB's ``var(x, 0)``), kurtosis β₂ = m₄ / m₂² (central moments with N,
as ``moment``; m₂ + eps in the denominator, as the toolbox). A value is an outlier if

    |x − μ| > 2σ        when 2 ≤ β₂ ≤ 4 (the pair's values look normal)
    |x − μ| > √20·σ     otherwise.

Per participant, P and Q count outliers and the participant is rejected when

    P + Q > 0.05 × (the pairs they judged)   and   |P − Q| / (P + Q) < 0.3.

Rules (``rule``):
- ``"toolbox"`` (default: what ``data_analysis.m`` computes): P counts the outliers in pairs whose
  β₂ is in [2, 4], Q those in the other pairs; every outlying value is removed, and every value of
  a rejected participant.
- ``"bt500"`` (ITU-R BT.500 §A1-2.3.1 as written): P counts outliers above μ, Q below, whatever the
  pair's kurtosis (the standard's P/Q: a participant far off to one side is kept, one erratic to
  both sides rejected); only rejected participants' values are removed.
The toolbox's comment names BT.500 but its P and Q are not the standard's; both are offered, the
toolbox's by default so that numbers match those it produced. The toolbox's "of the pairs" is of
every pair (everyone judged all); here it is of the pairs the participant judged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

ScreeningRule = Literal["toolbox", "bt500"]
EPS = np.finfo(np.float64).eps  # MATLAB's eps, as the toolbox adds it to m₂²


@dataclass(frozen=True)
class Screening:
    """``kept`` (participants × pairs, bool): values that stay; ``rejected`` (participants,):
    participants removed whole; ``p``/``q`` (participants,): their outlier counts; ``outliers``
    (participants × pairs, bool)."""

    kept: np.ndarray
    rejected: np.ndarray
    p: np.ndarray
    q: np.ndarray
    outliers: np.ndarray
    rule: str


def screen(values: np.ndarray, rule: ScreeningRule = "toolbox") -> Screening:
    """Screen the participants × pairs ``values`` (NaN: not judged) by ``rule``."""
    if rule not in ("toolbox", "bt500"):
        raise ValueError(f"screening rule must be toolbox or bt500, got {rule!r}")
    x = np.asarray(values, dtype=np.float64)
    judged = np.isfinite(x)
    n = judged.sum(axis=0)                                      # (pairs,) participants per pair
    safe_n = np.maximum(n, 1)
    filled = np.where(judged, x, 0.0)
    mean = filled.sum(axis=0) / safe_n
    dev = np.where(judged, x - mean, 0.0)
    m2 = (dev ** 2).sum(axis=0) / safe_n
    m4 = (dev ** 4).sum(axis=0) / safe_n
    sigma = np.sqrt((dev ** 2).sum(axis=0) / np.maximum(n - 1, 1))
    kurtosis = m4 / (m2 ** 2 + EPS)
    normal = (kurtosis >= 2) & (kurtosis <= 4)
    k = np.where(normal, 2.0, np.sqrt(20.0))
    above = judged & (dev > k * sigma) & (n >= 2)
    below = judged & (dev < -k * sigma) & (n >= 2)
    outliers = above | below
    if rule == "toolbox":
        p = (outliers & normal).sum(axis=1)
        q = (outliers & ~normal).sum(axis=1)
    else:
        p, q = above.sum(axis=1), below.sum(axis=1)
    rated = judged.sum(axis=1)
    total = p + q
    with np.errstate(invalid="ignore", divide="ignore"):
        balance = np.abs(p - q) / total
    rejected = (total > 0.05 * rated) & (total > 0) & (balance < 0.3)
    kept = judged & ~rejected[:, None]
    if rule == "toolbox":
        kept &= ~outliers
    return Screening(kept=kept, rejected=rejected, p=p, q=q, outliers=outliers, rule=rule)
