"""Power-law tail fits of an eigenvalue spectrum: the Hill / continuous-MLE exponent with a
Kolmogorov-Smirnov choice of the tail start ``xmin`` (Clauset et al.), as in TempBalance /
AlphaPruning (``net_esd_estimator``) and WeightWatcher (``WWFit``).

For a sorted spectrum ``lam`` (ascending, N values) and a candidate start index ``i`` the tail
has ``n = N - i`` points and

    alpha_i = 1 + n / (sum_{j>=i} ln lam_j - n ln lam_i)
    D_i     = max_j' | 1 - (lam_{i+j'} / lam_i)^(1 - alpha_i) - j'/n |,   j' = 0..n-1

(``D_i = 1`` when ``alpha_i <= 1``). The fit keeps the candidate with the smallest ``D``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

XMIN_STRATEGIES = ("peak", "median", "scan")
# Eigenvalues at or below this are dropped before fitting (WeightWatcher's EVALS_THRESH): an
# exactly zero or denormal eigenvalue would otherwise give log(0) = -inf.
EVALS_THRESH = 1e-5
HIST_BINS = 100


@dataclass(frozen=True)
class PowerLawFit:
    alpha: float
    xmin: float
    D: float
    n_tail: int  # eigenvalues >= xmin used by the fit
    n_fit: int  # eigenvalues above the zero threshold (what the fit saw)


def _candidates(lam: np.ndarray, log_lam: np.ndarray, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """alpha_i and D_i for every start index in ``idx`` (vectorised over candidates)."""
    N = lam.size
    suffix = np.cumsum(log_lam[::-1])[::-1]  # suffix[i] = sum_{j>=i} log lam_j
    n = (N - idx).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        alphas = 1.0 + n / (suffix[idx] - n * log_lam[idx])
    Ds = np.ones(idx.size)
    ok = np.isfinite(alphas) & (alphas > 1)
    # chunk so the (candidates x N) work array stays small
    chunk = max(1, 2_000_000 // max(N, 1))
    cols = np.arange(N)
    for s in range(0, idx.size, chunk):
        sel = np.nonzero(ok[s : s + chunk])[0] + s
        if sel.size == 0:
            continue
        i = idx[sel][:, None]
        j = cols[None, :]
        rel = j - i  # j' for tail points, negative before the tail
        dlog = np.maximum(log_lam[None, :] - log_lam[i], 0.0)  # before the tail: masked below
        cdf = 1.0 - np.exp((1.0 - alphas[sel])[:, None] * dlog)
        diff = np.abs(cdf - rel / n[sel][:, None])
        diff[rel < 0] = 0.0
        Ds[sel] = diff.max(axis=1)
    return alphas, Ds


def fit_power_law(evals: np.ndarray, xmin: str = "peak", compat: bool = False, thresh: float = EVALS_THRESH) -> PowerLawFit:
    """Fit the tail of ``evals`` (any order) with the tail start chosen by ``xmin``:

    * ``"peak"``: the reference default (FIX-FINGER): candidates between 0.95x and 1.5x the left
      edge of the fullest bin of a 100-bin histogram of log10 eigenvalues. ``compat=True``
      reproduces the reference's bug of comparing the raw eigenvalue with ``log10(0.95 x peak)``.
    * ``"median"``: the tail starts at the median eigenvalue (Hill with k ~ N/2).
    * ``"scan"``: every eigenvalue but the largest is a candidate (WeightWatcher's fit).
    """
    if xmin not in XMIN_STRATEGIES:
        raise ValueError(f"xmin must be one of {XMIN_STRATEGIES}, got {xmin!r}")
    lam = np.sort(np.asarray(evals, dtype=np.float64))
    lam = lam[np.isfinite(lam) & (lam > thresh)]
    N = lam.size
    if N < 3:
        raise ValueError(
            f"only {N} eigenvalues above {thresh:g}: a power-law fit needs at least 3 (the matrix is (nearly) zero)"
        )
    log_lam = np.log(lam)
    if xmin == "median":
        idx = np.array([N // 2])
    elif xmin == "scan":
        idx = np.arange(N - 1)
    else:
        idx = _peak_candidates(lam, compat)
        if idx.size == 0:
            # The reference returns alpha = 0 here; a full scan is the meaningful fallback.
            idx = np.arange(N - 1)
    alphas, Ds = _candidates(lam, log_lam, idx)
    best = int(np.argmin(Ds))
    i = int(idx[best])
    return PowerLawFit(float(alphas[best]), float(lam[i]), float(Ds[best]), N - i, N)


def _peak_candidates(lam: np.ndarray, compat: bool) -> np.ndarray:
    log10 = np.log10(lam)
    lo, hi = log10[0], log10[-1]
    # torch.histc semantics: HIST_BINS equal bins over [min, max], the max falls in the last bin
    if hi > lo:
        b = np.floor((log10 - lo) / (hi - lo) * HIST_BINS).astype(np.int64)
        b = np.clip(b, 0, HIST_BINS - 1)
        counts = np.bincount(b, minlength=HIST_BINS)
        edges = np.linspace(lo, hi, HIST_BINS + 1)
        peak = 10 ** edges[int(np.argmax(counts))]
    else:
        peak = lam[0]
    lower = math.log10(0.95 * peak) if compat else 0.95 * peak
    upper = 1.5 * peak
    cand = lam[:-1]
    return np.nonzero((cand >= lower) & (cand <= upper))[0]


def hill_estimator(samples: np.ndarray, k: int) -> float:
    """Classic Hill estimate of the tail exponent of a density ~ x^-alpha from the top ``k``
    samples: alpha = 1 + k / sum_{i<k} ln(x_(i) / x_(k)) (x sorted descending)."""
    x = np.sort(np.asarray(samples, dtype=np.float64))[::-1]
    if not 1 <= k < x.size:
        raise ValueError(f"k must be in [1, {x.size - 1}] for {x.size} samples, got {k}")
    return 1.0 + k / float(np.sum(np.log(x[:k] / x[k])))
