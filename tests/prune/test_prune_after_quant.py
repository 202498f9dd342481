"""Quantize, then prune: pruned weights take the zero-point code, kept codes and the quantizer's
scales stay, so the model is exactly quantized and exactly sparse; transformed models are refused.
Also: pruning to a lower sparsity than the model already has is an error."""

import copy

import pytest
import torch

import effml
from effml.prune import verify_sparsity
from effml.prune.masks import is_nm
from effml.prune.units import prunable_units
from effml.quant.api import prunable_after
from effml.quant.qlinear import QuantLinear
from effml.quant.quantizers import unpack_codes
from effml.testing import random_ids, tiny_model

_QUANT: dict = {}


def _quantized(family: str, method: str = "rtn", **kw):
    key = (family, method, tuple(sorted(kw.items())))
    if key not in _QUANT:
        model = tiny_model(family)
        ids = random_ids(model, 2, 16)
        effml.quantize(model, method, w_bits=4, calib=ids, **kw)
        _QUANT[key] = (model, ids)
    model, ids = _QUANT[key]
    return copy.deepcopy(model), ids


def _state(model):
    """Per QuantLinear: (signed codes, scales, zero points), read straight from the buffers."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            codes = unpack_codes(m.qweight, m.w_bits, (m.out_features, m.in_features)).long()
            zero = m.zeros.long() if not m.w_sym else torch.full_like(m.scales, 2 ** (m.w_bits - 1), dtype=torch.long)
            g = m.in_features if m.group_size is None else m.group_size
            out[name] = (codes - zero.repeat_interleave(g, 1), m.scales.clone())
    return out


@pytest.mark.parametrize("family,method,kw", [
    ("llama", "rtn", {}), ("phi3", "gptq", {}), ("qwen2", "rtn", {"w_sym": False, "group_size": 32}),
])
@pytest.mark.parametrize("prune_method,pattern", [("magnitude", None), ("wanda", "2:4"), ("sparsegpt", None)])
def test_prune_quantized_model_stays_on_its_grid(tmp_path, family, method, kw, prune_method, pattern):
    model, ids = _quantized(family, method, **kw)
    before = _state(model)
    effml.prune(model, None if pattern else 0.5, method=prune_method, allocation="uniform", pattern=pattern, calib=ids)
    after = _state(model)
    assert before.keys() == after.keys()
    for name, (codes, scales) in after.items():
        old_codes, old_scales = before[name]
        assert torch.equal(scales, old_scales), name  # the quantizer's scales are kept
        kept = codes != 0
        if prune_method != "sparsegpt":  # mask only: every kept code is unchanged
            assert torch.equal(codes[kept], old_codes[kept]), name
    units = prunable_units(model)
    zeros = sum(u.zeros() for u in units) / sum(u.numel for u in units)
    assert zeros >= 0.5 - 1e-3
    for u in units:
        w = u.weight
        if pattern:
            assert is_nm(w, 2, 4), u.name
        q = u.ref.module  # the dequantized weight is exactly the stored codes times scales
        assert torch.equal(q.dequantized_weight()[u.rows], w.to(q.dequantized_weight().dtype))
    effml.save(model, tmp_path)
    loaded = effml.load(tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    verify_sparsity(loaded)


def test_prune_after_transform_methods_is_refused():
    assert not prunable_after("quarot") and prunable_after("rtn")
    model, ids = _quantized("llama", "quarot", w_mse=False)  # the MSE clip search is slow and beside the point
    with pytest.raises(ValueError, match="Prune the model first"):
        effml.prune(model, 0.5, method="magnitude", allocation="uniform")


@pytest.mark.parametrize("quantize_first", [False, True])
def test_lower_sparsity_than_existing_is_an_error(quantize_first):
    model = tiny_model("llama")
    ids = random_ids(model, 2, 16)
    if quantize_first:
        effml.quantize(model, "rtn", w_bits=4)
    effml.prune(model, 0.5, method="wanda", allocation="uniform", calib=ids)
    with pytest.raises(ValueError, match="already 0.5000 sparse"):
        effml.prune(model, 0.3, method="magnitude", allocation="uniform")
    effml.prune(model, 0.5, method="magnitude", allocation="uniform")  # equal: fine
    effml.prune(model, 0.6, method="magnitude", allocation="uniform")  # higher: fine
    units = prunable_units(model)
    assert sum(u.zeros() for u in units) / sum(u.numel for u in units) >= 0.6 - 1e-3
