"""IQA evaluation criteria: SRCC, KRCC, PLCC and RMSE after a 4-parameter logistic fit.

PLCC and RMSE follow the VQEG practice the LIQE paper uses: predictions are first mapped to
the MOS scale by ``f(x) = b2 + (b1 - b2) / (1 + exp(-(x - b3) / |b4|))`` (least squares, with the
reference code's initial guess), then compared with the MOS. When the fit is impossible
(constant predictions) or fails to converge, the result says so in ``note`` instead of raising.
"""

from __future__ import annotations

import math
import warnings
from collections import defaultdict
from dataclasses import asdict, dataclass

import numpy as np
from scipy import optimize, stats


@dataclass
class Correlation:
    """Agreement of predictions with MOS on one set of images."""

    srcc: float
    krcc: float
    plcc: float
    rmse: float
    n: int
    note: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


def logistic4(x: np.ndarray, b1: float, b2: float, b3: float, b4: float) -> np.ndarray:
    """The monotonic 4-parameter logistic mapping of predictions onto the MOS scale."""
    z = np.clip(-(x - b3) / max(abs(b4), 1e-12), -500, 500)
    return b2 + (b1 - b2) / (1.0 + np.exp(z))


def fit_logistic(pred: np.ndarray, mos: np.ndarray) -> tuple[np.ndarray, str]:
    """Predictions mapped onto the MOS scale, and a note ("" when the fit succeeded)."""
    if np.ptp(pred) == 0:
        return np.full_like(mos, mos.mean(), dtype=float), "constant predictions: no logistic fit possible"
    if pred.size <= 4:
        return pred.astype(float), f"only {pred.size} images: too few for the 4-parameter fit; PLCC/RMSE on raw predictions"
    p0 = [mos.max(), mos.min(), pred.mean(), pred.std() or 1.0]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optimize.OptimizeWarning)
            params, _ = optimize.curve_fit(logistic4, pred, mos, p0=p0, maxfev=20000)
        return logistic4(pred, *params), ""
    except (RuntimeError, ValueError, TypeError) as exc:
        return pred.astype(float), f"logistic fit failed ({exc}); PLCC/RMSE on raw predictions"


def correlation(pred, mos) -> Correlation:
    """SRCC, KRCC, PLCC (after the logistic fit) and RMSE of ``pred`` against ``mos``."""
    pred = np.asarray(pred, dtype=float).ravel()
    mos = np.asarray(mos, dtype=float).ravel()
    if pred.shape != mos.shape:
        raise ValueError(f"predictions ({pred.size}) and MOS ({mos.size}) differ in length")
    n = pred.size
    if n < 3:
        return Correlation(math.nan, math.nan, math.nan, math.nan, n, f"only {n} images: need at least 3")
    notes = []
    if np.ptp(mos) == 0:
        notes.append("constant MOS")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", stats.ConstantInputWarning)
        srcc = float(stats.spearmanr(pred, mos)[0])
        krcc = float(stats.kendalltau(pred, mos)[0])
        fitted, note = fit_logistic(pred, mos)
        if note:
            notes.append(note)
        plcc = float(stats.pearsonr(fitted, mos)[0]) if np.ptp(fitted) > 0 and np.ptp(mos) > 0 else math.nan
    rmse = float(np.sqrt(np.mean((fitted - mos) ** 2)))
    return Correlation(srcc, krcc, plcc, rmse, n, "; ".join(notes))


def by_dataset(pred, mos, datasets) -> dict[str, Correlation]:
    """:func:`correlation` for each dataset name in ``datasets`` (same length as ``pred``)."""
    groups: dict[str, list[int]] = defaultdict(list)
    for i, name in enumerate(datasets):
        groups[str(name)].append(i)
    pred = np.asarray(pred, dtype=float)
    mos = np.asarray(mos, dtype=float)
    return {name: correlation(pred[idx], mos[idx]) for name, idx in sorted(groups.items())}


@dataclass
class SplitSummary:
    """Median and standard deviation of one criterion over splits (the paper's Table 1 format)."""

    median: float
    std: float
    n_splits: int

    def __str__(self) -> str:
        return f"{self.median:.3f} (±{self.std:.3f})"


def summarize_splits(results: list[dict[str, Correlation]],
                     criteria: tuple[str, ...] = ("srcc", "plcc", "krcc", "rmse")) -> dict[str, dict[str, SplitSummary]]:
    """Per dataset and criterion, median and std over splits (NaN splits are left out)."""
    values: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for split in results:
        for dataset, corr in split.items():
            for c in criteria:
                v = getattr(corr, c)
                if not math.isnan(v):
                    values[dataset][c].append(v)
    out: dict[str, dict[str, SplitSummary]] = {}
    for dataset, per in values.items():
        out[dataset] = {c: SplitSummary(float(np.median(v)), float(np.std(v)), len(v)) for c, v in per.items()}
    return out
