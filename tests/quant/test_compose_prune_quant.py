"""Prune, then quantize: the pruned zeros stay exactly zero (RTN, mask-aware GPTQ, SmoothQuant),
N:M patterns survive, and QuaRot / FlatQuant say up front that they lose the sparsity."""

import copy
import logging

import pytest
import torch

import effml
from effml.core.hessian import damped_inverse_cholesky
from effml.prune.masks import is_nm
from effml.prune.units import prunable_units
from effml.quant.api import preserves_sparsity, prunable_after, supports_recursive
from effml.quant.gptq import gptq_quantize
from effml.testing import FAMILIES, random_ids, tiny_model

_PRUNED: dict = {}


def _pruned(family: str, pattern: str | None):
    """A tiny model pruned by Wanda (50% unstructured or N:M), cached per (family, pattern)."""
    key = (family, pattern)
    if key not in _PRUNED:
        model = tiny_model(family)
        ids = random_ids(model, 2, 16)
        effml.prune(model, None if pattern else 0.5, method="wanda", allocation="uniform", pattern=pattern, calib=ids)
        _PRUNED[key] = (model, ids)
    model, ids = _PRUNED[key]
    return copy.deepcopy(model), ids


def _weights(model) -> list[torch.Tensor]:
    return [u.weight.clone() for u in prunable_units(model)]


def _plain_rtn(w: torch.Tensor, bits: int = 4) -> torch.Tensor:
    """Symmetric per-channel RTN written out in plain torch (scales stored as float16)."""
    qmax = 2 ** (bits - 1) - 1
    scale = (w.abs().amax(1, keepdim=True) / qmax).clamp_min(1e-8).half().float()
    return torch.clamp(torch.round(w / scale), -qmax - 1, qmax) * scale


@pytest.mark.parametrize("pattern", [None, "2:4"])
@pytest.mark.parametrize("family", FAMILIES)
def test_pruned_zeros_survive_quantization(family, pattern):
    for method in ("rtn", "gptq", "smoothquant"):
        model, ids = _pruned(family, pattern)
        before = _weights(model)
        effml.quantize(model, method, w_bits=4, calib=ids)
        after = _weights(model)
        zeros_before = sum(int((w == 0).sum()) for w in before)
        zeros_after = sum(int((w == 0).sum()) for w in after)
        numel = sum(w.numel() for w in before)
        for u, b, a in zip(prunable_units(model), before, after):
            # every pruned weight is still exactly 0 (never un-pruned) ...
            assert bool((a[b == 0] == 0).all()), (method, u.name)
            if pattern:
                assert is_nm(a, 2, 4), (method, u.name)
            if method == "rtn":  # ... and the kept ones are plain RTN of the pruned weight
                assert torch.equal(a, _plain_rtn(b)), u.name
        # the sparsity only grows by kept weights whose nearest grid point is 0
        assert zeros_before <= zeros_after <= zeros_before + 0.02 * numel, (method, zeros_before, zeros_after)


def _plain_joint_gptq(w, h, mask, bits=4, damp=0.01):
    """Textbook OBS sweep, one column at a time: quantize, force masked to 0, feed the error."""
    w = w.double().clone()
    hinv = damped_inverse_cholesky(h.double(), damp)
    qmax = 2 ** (bits - 1) - 1
    scale = (w.abs().amax(1) / qmax).clamp_min(1e-8).half().double()
    out = torch.zeros_like(w)
    for j in range(w.shape[1]):
        q = torch.clamp(torch.round(w[:, j] / scale), -qmax - 1, qmax) * scale
        q[mask[:, j]] = 0
        err = (w[:, j] - q) / hinv[j, j]
        w[:, j:] -= err[:, None] * hinv[j, j:][None, :]
        out[:, j] = q
    return out


def test_mask_aware_gptq_matches_plain_reference_and_beats_remasking():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(32, 64, generator=g)
    # correlated inputs, so the OBS feedback is large enough to move pruned weights off zero
    x = torch.randn(512, 64, generator=g) @ (torch.eye(64) + 0.5 * torch.randn(64, 64, generator=g))
    h = 2 * x.T.double() @ x.double() / x.shape[0]
    mask = torch.rand(32, 64, generator=g) < 0.5
    w = w.masked_fill(mask, 0)
    # the plain reference below uses the absmax / 7 grid
    q, scale, zero, _ = gptq_quantize(w, h, 4, sym=True, block_size=16, act_order=False, grid="absmax7")
    ref = _plain_joint_gptq(w, h, mask)
    torch.testing.assert_close(q.double(), ref, rtol=0, atol=1e-6)
    assert bool((q[mask] == 0).all())
    codes = q.double() / scale.double()  # kept weights on the stored grid
    torch.testing.assert_close(codes, codes.round(), rtol=0, atol=1e-5)

    def err(v):
        return float(((v.double() - w.double()) @ x.double().T).pow(2).sum())

    # mask-unaware GPTQ (a dense sweep), re-masked afterwards, is what "un-pruning" fixes
    dense = _plain_joint_gptq(w, h, torch.zeros_like(mask))
    assert int((dense[mask] != 0).sum()) > 0  # a dense sweep un-prunes
    assert err(q) < err(dense.masked_fill(mask, 0))
    assert err(q) < err(_plain_rtn(w))


def test_traits_are_queryable_before_any_work():
    for method in ("rtn", "gptq", "smoothquant"):
        assert preserves_sparsity(method) and prunable_after(method) and supports_recursive(method)
    for method in ("quarot", "flatquant"):
        assert not preserves_sparsity(method) and not prunable_after(method) and not supports_recursive(method)
    assert preserves_sparsity("quarot", {"rotate": False})  # the no-rotation ablation keeps zeros
    with pytest.raises(ValueError, match="unknown quantization method"):
        preserves_sparsity("nope")


def test_quarot_on_pruned_model_warns_and_reports_lost_sparsity(caplog):
    model, ids = _pruned("llama", None)
    with caplog.at_level(logging.WARNING, logger="effml.quant.api"):
        effml.quantize(model, "quarot", w_bits=4, w_mse=False)
    assert any("lose the sparsity" in r.getMessage() for r in caplog.records)
    report = model.effml_report  # the quantize report's keys sit at the top level
    assert report["linear_sparsity"]["before"] == pytest.approx(0.5)
    assert report["linear_sparsity"]["after"] < 0.25  # rotated: dense but for 4-bit codes rounding to 0
