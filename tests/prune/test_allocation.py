import numpy as np
import pytest

from effml.prune.allocation import (
    alpha_allocation,
    nm_allocation,
    owl_allocation,
    uniform_allocation,
    weighted_mean,
)


def test_alpha_mapping_matches_formula_and_mean_is_exact():
    rng = np.random.default_rng(0)
    q = rng.uniform(1.5, 7, 30)
    n = rng.integers(1_000, 50_000, 30)
    for S, eps in [(0.5, 0.2), (0.7, 0.3), (0.6, 0.0)]:
        s = alpha_allocation(q, n, S, eps)
        r = (1 - eps) + 2 * eps * (q - q.min()) / (q.max() - q.min())
        expected = r * S * n.sum() / (n * r).sum()  # the reference's eta * r, no clipping needed here
        np.testing.assert_allclose(s, expected, rtol=1e-12)
        assert weighted_mean(s, n) == pytest.approx(S, abs=1e-12)
        if eps > 0:
            assert s.max() / s.min() == pytest.approx((1 + eps) / (1 - eps), rel=1e-12)
            assert np.argmax(s) == np.argmax(q) and np.argmin(s) == np.argmin(q)


def test_alpha_ratios_above_one_are_clipped_and_mean_kept():
    q = np.array([1.0, 2.0, 3.0, 10.0, 10.0])
    n = np.array([10, 10, 10, 10, 10])
    raw = (0.5 + np.array([0, 1, 2, 9, 9]) / 9) * 0.8 * 50 / (10 * (0.5 + np.array([0, 1, 2, 9, 9]) / 9)).sum()
    assert raw.max() > 1  # the unclipped reference mapping would exceed 1
    s = alpha_allocation(q, n, 0.8, 0.5)
    assert s.max() <= 1.0 and weighted_mean(s, n) == pytest.approx(0.8, abs=1e-12)
    assert (s[3:] == 1.0).all()
    free = s[:3] / (0.5 + np.array([0, 1, 2]) / 9)  # unclipped units keep their relative ratios
    np.testing.assert_allclose(free, free[0])
    s = alpha_allocation(q, n, 0.8, 0.5, ceiling=0.9)
    assert s.max() <= 0.9 + 1e-15 and weighted_mean(s, n) == pytest.approx(0.8, abs=1e-12)


def test_equal_metrics_give_uniform():
    np.testing.assert_allclose(alpha_allocation([3.0] * 4, [5, 6, 7, 8], 0.6, 0.3), 0.6)
    np.testing.assert_allclose(uniform_allocation([1, 2], 0.4), 0.4)


@pytest.mark.parametrize("bad", [1.0, -0.1, 1.5, float("nan")])
def test_bad_sparsity_and_epsilon(bad):
    with pytest.raises(ValueError, match=r"sparsity must be a number in \[0, 1\)"):
        alpha_allocation([1, 2], [1, 1], bad, 0.3)
    with pytest.raises(ValueError, match=r"epsilon must be a number in \[0, 1\)"):
        alpha_allocation([1, 2], [1, 1], 0.5, bad)


def test_owl_formula():
    lod = np.array([2.0, 5.0, 3.0, 8.0])
    s = owl_allocation(lod, 0.7, lam=0.08)
    d = (lod - 2) / 6 * 0.16
    np.testing.assert_allclose(s, 1 - (d - d.mean() + 0.3))
    assert s.mean() == pytest.approx(0.7) and s.max() - s.min() == pytest.approx(0.16)
    assert np.argmin(s) == 3  # most outliers -> least sparsity


def test_mixed_nm_keeps_the_mean_n():
    rng = np.random.default_rng(1)
    ratios = rng.uniform(0.35, 0.65, 30)
    ns = nm_allocation(ratios, np.ones(30), 8, 4)
    assert ns.sum() == 4 * 30 and ns.min() >= 0 and ns.max() <= 7
    assert np.corrcoef(ns, ratios)[0, 1] > 0.8
    with pytest.raises(ValueError, match="N must be in"):
        nm_allocation(ratios, np.ones(30), 4, 4)


def test_outlier_ratio_is_percent_above_m_times_mean():
    import torch

    from effml.prune.owl import outlier_ratio

    a = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 13.0]])
    b = torch.tensor([2.0, 0.0])
    # mean of all 10 scores = 24 / 10 = 2.4; above 5 x 2.4 = 12: one value -> 10%
    assert outlier_ratio([a, b], 5.0) == pytest.approx(10.0)
    assert outlier_ratio([a, b], 0.5) == pytest.approx(20.0)  # above 1.2: the 13 and the 2
