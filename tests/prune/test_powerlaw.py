import math

import numpy as np
import pytest

from effml.prune.powerlaw import fit_power_law, hill_estimator


def pareto(alpha: float, n: int, seed: int, xmin: float = 1.0) -> np.ndarray:
    """Samples with density ~ x^-alpha on [xmin, inf) by inverse-CDF."""
    u = np.random.default_rng(seed).random(n)
    return xmin * (1.0 - u) ** (-1.0 / (alpha - 1.0))


def reference_fit(evals, lower=None, upper=None):
    """Plain-loop transcription of the reference estimator (TempBalance net_esd_estimator):
    alpha = 1 + n / (sum log tail - n log xmin), KS D over the tail, argmin D."""
    lam = np.sort(np.asarray(evals, dtype=np.float64))
    N = lam.size
    alphas, Ds = np.zeros(N - 1), np.ones(N - 1)
    for i, x in enumerate(lam[:-1]):
        if lower is not None and x < lower:
            continue
        if upper is not None and x > upper:
            break
        n = float(N - i)
        a = 1 + n / (np.sum(np.log(lam[i:])) - n * np.log(x))
        alphas[i] = a
        if a > 1:
            Ds[i] = np.max(np.abs(1 - (lam[i:] / x) ** (-a + 1) - np.arange(n) / n))
    i = int(np.argmin(Ds))
    return alphas[i], lam[i]


@pytest.mark.parametrize("alpha", [1.5, 2.0, 3.0, 4.5])
def test_hill_recovers_pareto_alpha(alpha):
    x = pareto(alpha, 10_000, seed=int(alpha * 10))
    assert abs(hill_estimator(x, k=5_000) - alpha) / alpha < 0.05
    # the full KS scan is O(n^2): run it on two of the alphas only
    for strategy in ("median", "peak") + (("scan",) if alpha in (2.0, 4.5) else ()):
        fit = fit_power_law(x, xmin=strategy)
        assert abs(fit.alpha - alpha) / alpha < 0.05, (strategy, fit)


def test_scan_equals_plain_reference_loop():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((300, 120)) @ np.diag(np.linspace(0.2, 3, 120) ** 2)
    evals = np.linalg.svd(w, compute_uv=False) ** 2
    ref_alpha, ref_xmin = reference_fit(evals)
    fit = fit_power_law(evals, xmin="scan")
    assert fit.alpha == pytest.approx(ref_alpha, rel=1e-10)
    assert fit.xmin == ref_xmin


def _peak(evals):
    log10 = np.log10(np.sort(evals))
    counts, edges = np.histogram(log10, bins=100, range=(log10[0], log10[-1]))
    return 10 ** edges[np.argmax(counts)]


@pytest.mark.parametrize("scale", [0.3, 30.0])  # peak below and above 1/0.95: the bug is inactive / active
def test_peak_fixed_and_compat_match_reference_bounds(scale):
    x = pareto(3.0, 2_000, seed=1, xmin=scale)
    peak = _peak(x)
    fixed = reference_fit(x, lower=0.95 * peak, upper=1.5 * peak)
    buggy = reference_fit(x, lower=math.log10(0.95 * peak), upper=1.5 * peak)
    assert fit_power_law(x, "peak").alpha == pytest.approx(fixed[0], rel=1e-10)
    assert fit_power_law(x, "peak", compat=True).alpha == pytest.approx(buggy[0], rel=1e-10)


def test_median_is_hill_at_half():
    x = pareto(2.5, 4_001, seed=3)
    lam = np.sort(x)
    i = lam.size // 2
    n = lam.size - i
    expected = 1 + n / np.sum(np.log(lam[i:] / lam[i]))
    assert fit_power_law(x, "median").alpha == pytest.approx(expected, rel=1e-12)


def test_zero_and_denormal_eigenvalues_stay_finite():
    x = np.concatenate([pareto(3.0, 500, seed=4), np.zeros(50), np.full(10, 5e-324), np.full(5, 1e-300)])
    for strategy in ("scan", "median", "peak"):
        fit = fit_power_law(x, strategy)
        assert math.isfinite(fit.alpha) and math.isfinite(fit.D) and fit.n_fit == 500


def test_bad_inputs():
    with pytest.raises(ValueError, match="xmin must be one of"):
        fit_power_law(np.ones(10), "mode")
    with pytest.raises(ValueError, match="at least 3"):
        fit_power_law(np.zeros(100), "scan")
    with pytest.raises(ValueError, match="k must be"):
        hill_estimator(np.ones(10), 10)
