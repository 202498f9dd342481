"""Per-layer sparsity allocation: uniform, AlphaPruning's multiplicative metric mapping, OWL's
outlier-weighted mapping, and the rounding of ratios to a mixed N:M pattern per layer."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

ALLOCATIONS = ("uniform", "alpha", "owl")
# epsilon="auto": effml picks AlphaPruning's range per model by a calibration proxy (auto_epsilon.py)
AUTO_EPSILON = "auto"


def check_sparsity(sparsity: float) -> float:
    if not (isinstance(sparsity, (int, float)) and 0.0 <= float(sparsity) < 1.0):
        raise ValueError(f"sparsity must be a number in [0, 1), got {sparsity!r}")
    return float(sparsity)


def check_epsilon(epsilon: float) -> float:
    if not (isinstance(epsilon, (int, float)) and 0.0 <= float(epsilon) < 1.0):
        raise ValueError(f"epsilon must be a number in [0, 1), got {epsilon!r}")
    return float(epsilon)


def check_epsilon_setting(epsilon) -> float | str:
    """A :class:`PruneConfig` epsilon: ``"auto"`` or a fixed number in [0, 1)."""
    if isinstance(epsilon, str) and epsilon == AUTO_EPSILON:
        return AUTO_EPSILON
    if isinstance(epsilon, bool) or not (isinstance(epsilon, (int, float)) and 0.0 <= float(epsilon) < 1.0):
        raise ValueError(
            f'epsilon must be a number in [0, 1) (0.3 is the paper\'s default) or "auto" (effml picks it from '
            f"candidates by a calibration proxy), got {epsilon!r}"
        )
    return float(epsilon)


def check_epsilon_candidates(candidates) -> tuple[float, ...]:
    """Sorted distinct candidates for epsilon="auto"; 0 (uniform) must be one of them, so the
    choice is never worse than uniform allocation on the proxy."""
    try:
        values = tuple(sorted({check_epsilon(c) for c in candidates}))
    except TypeError:
        raise ValueError(f"epsilon_candidates must be a sequence of numbers in [0, 1), got {candidates!r}") from None
    if 0.0 not in values:
        raise ValueError(
            f"epsilon_candidates must include 0 (uniform allocation), which keeps epsilon='auto' never worse "
            f"than uniform on its proxy; got {candidates!r}"
        )
    return values


def weighted_mean(ratios: Sequence[float], sizes: Sequence[int]) -> float:
    r, n = np.asarray(ratios, dtype=np.float64), np.asarray(sizes, dtype=np.float64)
    return float((r * n).sum() / n.sum())


def uniform_allocation(sizes: Sequence[int], sparsity: float) -> np.ndarray:
    return np.full(len(sizes), check_sparsity(sparsity), dtype=np.float64)


def _rescale_to_mean(base: np.ndarray, sizes: np.ndarray, sparsity: float, ceiling: float) -> np.ndarray:
    """s = eta * base with the size-weighted mean of s equal to ``sparsity``; units that would
    exceed ``ceiling`` are pinned there and the rest rescaled (water-filling), so the mean holds."""
    pinned = np.zeros(base.size, dtype=bool)
    total = sparsity * sizes.sum()
    for _ in range(base.size + 1):
        free = ~pinned
        budget = total - ceiling * sizes[pinned].sum()
        denom = (sizes[free] * base[free]).sum()
        if denom <= 0:
            raise ValueError("cannot reach the target sparsity: every unit is at the ceiling")
        s = np.where(pinned, ceiling, base * budget / denom)
        over = free & (s > ceiling)
        if not over.any():
            return s
        pinned |= over
    raise RuntimeError("allocation rescaling did not converge")  # pragma: no cover - bounded by the loop


def alpha_allocation(
    metric: Sequence[float], sizes: Sequence[int], sparsity: float, epsilon: float = 0.3, ceiling: float = 1.0
) -> np.ndarray:
    """AlphaPruning's mapping: ratio r = (1-eps) + 2 eps (q - q_min)/(q_max - q_min) in
    [1-eps, 1+eps] (higher metric, more sparsity), then s = eta r with the parameter-weighted
    mean of s exactly ``sparsity``. Ratios that would pass ``ceiling`` are clipped to it and
    the excess spread over the other units multiplicatively, keeping the mean."""
    sparsity, epsilon = check_sparsity(sparsity), check_epsilon(epsilon)
    q = np.asarray(metric, dtype=np.float64)
    n = np.asarray(sizes, dtype=np.float64)
    if q.shape != n.shape or q.ndim != 1 or q.size == 0:
        raise ValueError(f"metric and sizes must be equal-length 1-D sequences, got {q.shape} and {n.shape}")
    if not np.isfinite(q).all():
        raise ValueError("the allocation metric has NaN/inf values")
    if not 0 < ceiling <= 1:
        raise ValueError(f"ceiling must be in (0, 1], got {ceiling}")
    if sparsity > ceiling:
        raise ValueError(f"sparsity {sparsity} is above the ceiling {ceiling}")
    span = q.max() - q.min()
    # all metrics equal: no ranking information, the mapping degenerates to uniform
    r = np.ones_like(q) if span == 0 else (1 - epsilon) + 2 * epsilon * (q - q.min()) / span
    if sparsity == 0:
        return np.zeros_like(q)
    return _rescale_to_mean(r, n, sparsity, ceiling)


def owl_allocation(outlier_ratio: Sequence[float], sparsity: float, lam: float = 0.08) -> np.ndarray:
    """OWL (Yin et al. 2024, reference code): d = (LOD - min)/(max - min) * 2 lam, shifted so its
    mean is 1 - S; s = 1 - d in [S - lam, S + lam] (higher outlier ratio, less sparsity). The
    mean is unweighted, as in the reference (blocks have equal sizes); s <= 0 becomes 0.01."""
    sparsity = check_sparsity(sparsity)
    if not 0 <= lam < 1:
        raise ValueError(f"OWL lambda must be in [0, 1), got {lam}")
    lod = np.asarray(outlier_ratio, dtype=np.float64)
    span = lod.max() - lod.min()
    d = np.zeros_like(lod) if span == 0 else (lod - lod.min()) / span * 2 * lam
    d = d - d.mean() + (1 - sparsity)
    s = 1 - d
    s[s <= 0] = 0.01
    if (s >= 1).any():
        raise ValueError(f"OWL gives a ratio >= 1 at sparsity {sparsity} with lambda {lam}: lower lambda")
    return s


def nm_allocation(ratios: Sequence[float], sizes: Sequence[int], m: int, mean_n: int) -> np.ndarray:
    """Round per-layer ratios to N_l:M patterns (N_l in [0, M-1]) whose size-weighted mean of
    N_l/M equals mean_n/M as closely as integers allow: floor every N_l*, then hand the remaining
    units of N to the layers with the largest remainders (ties: larger ratio first)."""
    r = np.asarray(ratios, dtype=np.float64)
    n = np.asarray(sizes, dtype=np.float64)
    if not 0 < mean_n < m:
        raise ValueError(f"N must be in [1, M-1] for an N:M pattern, got {mean_n}:{m}")
    # rescale so the weighted mean of the ideal N equals mean_n exactly, then bound
    ideal = r * m * (mean_n / m) / weighted_mean(r, n) if weighted_mean(r, n) > 0 else np.full_like(r, mean_n)
    ideal = np.clip(ideal, 0, m - 1)
    base = np.floor(ideal).astype(np.int64)
    target = mean_n * n.sum()  # sum of N_l * size_l wanted
    frac = ideal - base
    order = sorted(range(r.size), key=lambda i: (-frac[i], -r[i], i))
    have = float((base * n).sum())
    for i in order:
        if have + n[i] > target + 1e-9 or base[i] >= m - 1:
            continue
        base[i] += 1
        have += n[i]
    return base
