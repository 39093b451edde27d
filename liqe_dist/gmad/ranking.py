"""The global ranking of gMAD (the toolbox's ``scale_ml.m``): Thurstone Case V maximum-likelihood
scale values from a matrix of "wins".

    S* = argmin_S  −Σ_{i≠j} C_ij log Φ(S_i − S_j)     subject to  Σ_i S_i = 0

C_ij ≥ 0 is how strongly model i beats model j: the toolbox ranks by aggressiveness with
C = max(A, 0) (A signed, rows attackers) and by resistance with C = R (rows defenders). The
objective is convex and invariant to scaling C, so the toolbox's −100..100 scale and this
project's −1..1 give the same S. Cells without answers (NaN) count 0.

The toolbox solves it with CVX. Here: scipy's SLSQP with the analytic gradient, the equality
constraint as written, and S bounded to ±:data:`BOUND`: when some model never wins (or never
loses) against the rest, the likelihood has no maximum (its S runs off to ∓∞; CVX reports the
problem unbounded); such scores stop at the bound and :func:`thurstone_scores` says so.
"""

from __future__ import annotations

import numpy as np

BOUND = 8.0  # |S| at most this: Φ(−16) ≈ 6e−58, far past any real preference


def negative_log_likelihood(s: np.ndarray, counts: np.ndarray) -> tuple[float, np.ndarray]:
    """(−Σ C_ij log Φ(s_i − s_j), its gradient in s) for scale values ``s`` (n,) and ``counts`` (n, n)."""
    from scipy.special import log_ndtr

    d = s[:, None] - s[None, :]
    log_cdf = log_ndtr(d)
    # φ(d)/Φ(d) computed in logs: stable far in the lower tail
    ratio = np.exp(-0.5 * d * d - 0.5 * np.log(2 * np.pi) - log_cdf)
    g = counts * ratio
    return float(-(counts * log_cdf).sum()), -g.sum(axis=1) + g.sum(axis=0)


def bounded(counts: np.ndarray) -> bool:
    """Whether the maximum-likelihood scores exist: every model reaches every other through wins
    (the directed graph of C_ij > 0 is strongly connected)."""
    n = len(counts)
    wins = counts > 0
    reach = np.eye(n, dtype=bool) | wins
    for _ in range(max(1, int(np.ceil(np.log2(max(n, 2)))) + 1)):  # transitive closure by squaring
        reach = reach | ((reach.astype(np.int64) @ reach.astype(np.int64)) > 0)
    return bool(reach.all())


def thurstone_scores(counts: np.ndarray) -> tuple[np.ndarray, bool]:
    """(scale values S (n,) with Σ S = 0, whether they are a true maximum) for a wins matrix
    ``counts`` (n, n): NaN and the diagonal count 0, negative entries are an error."""
    from scipy.optimize import minimize

    c = np.nan_to_num(np.asarray(counts, dtype=np.float64), nan=0.0)
    if c.ndim != 2 or c.shape[0] != c.shape[1]:
        raise ValueError(f"counts must be a square matrix, got shape {c.shape}")
    if (c < 0).any():
        raise ValueError("counts must be >= 0 (clip the signed aggressiveness at 0 first, as the toolbox does)")
    np.fill_diagonal(c, 0.0)
    n = len(c)
    if n < 2 or not c.any():
        return np.zeros(n), n < 2
    total = c.sum()
    c = c / total  # scale-free (see the module docstring); keeps the optimiser's numbers near 1
    res = minimize(negative_log_likelihood, np.zeros(n), args=(c,), jac=True, method="SLSQP",
                   bounds=[(-BOUND, BOUND)] * n,
                   constraints=[{"type": "eq", "fun": lambda s: s.sum(), "jac": lambda s: np.ones_like(s)}],
                   options={"ftol": 1e-12, "maxiter": 500})
    s = res.x - res.x.mean()
    return s, bounded(c)
