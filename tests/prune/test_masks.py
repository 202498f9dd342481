import pytest
import torch

from effml.core.hessian import Hessian
from effml.prune.masks import (
    is_nm,
    magnitude_mask,
    nm_mask,
    parse_pattern,
    row_mask,
    wanda_mask,
    wanda_scores,
)
from effml.prune.sparsegpt import sparsegpt_prune


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_magnitude_mask_removes_exactly_the_smallest():
    w = torch.randn(30, 50, generator=gen())
    mask = magnitude_mask(w, 0.37)
    k = round(0.37 * w.numel())
    assert mask.sum() == k
    assert w[mask].abs().max() <= w[~mask].abs().min()


def test_row_mask_hits_the_ratio_exactly_with_near_equal_rows():
    s = torch.rand(7, 13, generator=gen(1))
    for ratio in (0.0, 0.3, 0.5, 0.71):
        mask = row_mask(s, ratio)
        assert mask.sum() == round(ratio * s.numel())
        per_row = mask.sum(1)
        assert per_row.max() - per_row.min() <= 1
        for r in range(7):  # within a row the pruned scores are the lowest
            if 0 < per_row[r] < 13:
                assert s[r][mask[r]].max() <= s[r][~mask[r]].min()


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4), (3, 8)])
def test_nm_masks(n, m):
    w = torch.randn(6, 32, generator=gen(2))
    mask = nm_mask(w.abs(), n, m)
    groups = mask.reshape(6, 32 // m, m)
    assert (groups.sum(-1) == n).all()
    pruned = w.masked_fill(mask, 0)
    assert is_nm(pruned, n, m) and not is_nm(pruned, n + 1, m)
    kept = w.abs().reshape(6, -1, m).masked_fill(groups, float("inf")).min(-1).values
    dropped = w.abs().reshape(6, -1, m).masked_fill(~groups, -1).max(-1).values
    assert (dropped <= kept).all()


def test_nm_errors():
    with pytest.raises(ValueError, match="not divisible by 8"):
        nm_mask(torch.rand(4, 12), 4, 8)
    for bad in ("4:4", "0:4", "2-4", "x"):
        with pytest.raises(ValueError, match="N:M"):
            parse_pattern(bad)
    assert parse_pattern("unstructured") is None and parse_pattern(" 2 : 4 ") == (2, 4)


def test_wanda_scores_equal_plain_torch_reference():
    w = torch.randn(8, 16, generator=gen(3))
    x = torch.randn(5, 7, 16, generator=gen(4)) * torch.linspace(0.1, 3, 16)
    sq = (x.reshape(-1, 16).double() ** 2).sum(0)
    ref = w.abs() * torch.linalg.vector_norm(x.reshape(-1, 16), dim=0).reshape(1, -1)
    torch.testing.assert_close(wanda_scores(w, sq), ref, rtol=1e-5, atol=1e-6)
    mask = wanda_mask(w, sq, 0.5)
    assert (mask.sum(1) == 8).all()  # half of each row
    ref_mask = torch.zeros_like(mask).scatter_(1, ref.argsort(1)[:, :8], True)
    assert torch.equal(mask, ref_mask)


def correlated_inputs(n=2048, d=64, seed=5):
    g = gen(seed)
    mix = torch.randn(d, d, generator=g) * torch.linspace(0.05, 1, d)
    return torch.randn(n, d, generator=g) @ mix + 0.3 * torch.randn(n, 1, generator=g)


@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_sparsegpt_beats_magnitude_on_reconstruction(nm):
    x = correlated_inputs()
    w = torch.randn(32, 64, generator=gen(6))
    acc = Hessian(64)
    for chunk in x.split(500):
        acc.add(chunk)
    torch.testing.assert_close(acc.h, 2 * x.double().T @ x.double() / x.shape[0])
    sgpt = sparsegpt_prune(w, acc.h, 0.5, nm=nm)  # block 128 covers all 64 columns
    mag = w.masked_fill(magnitude_mask(w, 0.5, nm), 0)
    assert (sgpt == 0).sum() == (mag == 0).sum() == w.numel() // 2
    if nm:
        assert is_nm(sgpt, *nm)
    err = lambda v: torch.linalg.matrix_norm((w - v) @ x.T).item()  # noqa: E731
    # the issue asks for 'below magnitude'; unstructured (free mask choice) must win clearly
    assert err(sgpt) < (0.8 if nm is None else 1.0) * err(mag)


def test_sparsegpt_exact_count_and_errors():
    x = correlated_inputs(d=48)
    acc = Hessian(48)
    acc.add(x)
    w = torch.randn(10, 48, generator=gen(7))
    for ratio in (0.13, 0.7):
        assert (sparsegpt_prune(w, acc.h, ratio, blocksize=20) == 0).sum() == round(ratio * 480)
    with pytest.raises(ValueError, match="multiple of M"):
        sparsegpt_prune(w, acc.h, 0.5, nm=(4, 8), blocksize=12)
    with pytest.raises(ValueError, match="not divisible"):
        sparsegpt_prune(w, acc.h, 0.5, nm=(3, 7))
