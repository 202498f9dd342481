"""Quantized tiny models of every family on the CPU kernels against the reference torch path;
resident memory; save/load; LM head quantization; the quantized KV cache in decode."""

import logging

import pytest
import torch
from effml.kernels import cpu_weight_only_dtype, dispatch, keep_dense_cache, use_kernels

import effml
from effml.quant.qlinear import QuantLinear
from effml.testing import FAMILIES, random_ids, tiny_model

# (w_bits, a_bits, group_size, CPU path every decoder linear takes); tiny sizes: in 64 / 96
CONFIGS = {
    "w4a16_g32": (4, 16, 32, "cpu_int4"),
    "w4a16_channel": (4, 16, None, "cpu_int4"),
    "w8a16": (8, 16, None, "cpu_int8w"),
    "w8a8": (8, 8, None, "cpu_intmm"),
    "w4a4": (4, 4, None, "cpu_intmm"),
}


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


def _quantized(family, w_bits, a_bits, group, **kw):
    model = tiny_model(family)
    return effml.quantize(model, "rtn", w_bits=w_bits, a_bits=a_bits, group_size=group, **kw)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_matches_the_reference_path(family):
    ids = random_ids(tiny_model(family), n=2, seq_len=12)
    for name, (w_bits, a_bits, group, path) in CONFIGS.items():
        model = _quantized(family, w_bits, a_bits, group)
        with torch.no_grad():
            with use_kernels("torch"):
                ref = model(ids).logits
            dispatch.calls.clear()
            with cpu_weight_only_dtype(torch.float32):  # exact weights: 1e-4
                fast = model(ids).logits
            n_linears = sum(isinstance(m, QuantLinear) for m in model.modules())
            assert dispatch.calls[path] == n_linears and dispatch.calls["torch"] == 0, (name, dict(dispatch.calls))
            assert _rel(fast, ref) < 1e-4, (family, name, _rel(fast, ref))
            if a_bits == 16:  # default bfloat16 activations: within bfloat16 rounding of the reference
                assert _rel(model(ids).logits, ref) < 3e-2, (family, name)
        assert all(m._deq is None for m in model.modules() if isinstance(m, QuantLinear))


def test_group16_falls_back_with_one_line_per_layer(caplog):
    model = _quantized("llama", 4, 16, 16)
    ids = random_ids(model, n=1, seq_len=8)
    with torch.no_grad(), caplog.at_level(logging.INFO, logger="effml.kernels.dispatch"):
        dispatch.calls.clear()
        y = model(ids).logits
        model(ids)
        with use_kernels("torch"):
            ref = model(ids).logits
    n_linears = sum(isinstance(m, QuantLinear) for m in model.modules())
    lines = [r for r in caplog.records if "group_size=16" in r.getMessage()]
    assert len(lines) == n_linears and dispatch.calls["cpu_int4"] == 0
    assert torch.equal(y, ref)


def test_save_load_comes_back_on_the_fast_path(tmp_path):
    model = _quantized("qwen2", 4, 16, 32, lm_head_bits=8)
    ids = random_ids(model, n=1, seq_len=10)
    with torch.no_grad():
        before = model(ids).logits
    state_keys = set(model.state_dict())
    effml.save(model, tmp_path / "m")
    loaded = effml.load(tmp_path / "m")
    assert set(loaded.state_dict()) == state_keys  # no kernel layout in the checkpoint
    assert isinstance(loaded.lm_head, QuantLinear) and loaded.lm_head.w_bits == 8
    dispatch.calls.clear()
    with torch.no_grad():
        after = loaded(ids).logits
    assert dispatch.calls["cpu_int4"] > 0 and dispatch.calls["cpu_int8w"] == 1 and dispatch.calls["torch"] == 0
    assert all("_kernel_cache" in m.__dict__ for m in loaded.modules() if isinstance(m, QuantLinear))
    assert torch.equal(after, before)


def test_resident_memory_is_packed_only():
    model = _quantized("llama", 4, 16, 32)
    ids = random_ids(model, n=1, seq_len=8)
    with torch.no_grad():
        model(ids)
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert all(m._deq is None for m in layers)
    fp32 = sum(4 * m.in_features * m.out_features for m in layers)
    resident = sum(dispatch.resident_bytes(m) for m in layers)
    assert resident <= 0.30 * fp32, resident / fp32
    # the explicit float cache, for users who want it
    keep_dense_cache(True)
    try:
        with torch.no_grad(), use_kernels("torch"):
            model(ids)
        assert all(m._deq is not None for m in layers)
    finally:
        keep_dense_cache(False)


@pytest.mark.parametrize("bits", [8, 4])
def test_lm_head_quantization_unties_and_reports(bits):
    model = tiny_model("llama", tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    embed = model.model.embed_tokens.weight.detach().clone()
    effml.quantize(model, "rtn", w_bits=4, group_size=32, lm_head_bits=bits)
    head = model.lm_head
    assert isinstance(head, QuantLinear) and head.w_bits == bits and head.act_quant is None
    assert torch.equal(model.model.embed_tokens.weight, embed)  # the embedding stays float
    rep = model.effml_report["lm_head"]
    assert rep["bits"] == bits and rep["untied_embeddings"] is True
    # the head's output is that of the dequantized weight
    h = torch.randn(3, 64)
    with torch.no_grad(), use_kernels("torch"):
        torch.testing.assert_close(head(h), h @ head.dequantized_weight().T, rtol=0, atol=1e-5)


def test_quantized_kv_cache_decode_matches_full_forward():
    """KV4 fake quantization is per (token, head), so cached decode sees the same keys and values
    as a full forward over the whole sequence."""
    model = _quantized("llama", 4, 4, None, kv_bits=4)
    ids = random_ids(model, n=2, seq_len=10)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False, use_cache=True,
                             output_logits=True, return_dict_in_generate=True, pad_token_id=0)
        full = model(out.sequences).logits
    for step, logits in enumerate(out.logits):
        pos = ids.shape[1] - 1 + step
        assert _rel(logits, full[:, pos]) < 1e-4
