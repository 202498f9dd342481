"""Gemma-3-270M, the second real model: checks that would have caught QuaRot's folded-norm
blow-up (W4A16 2.2e13 x FP on 2 x 512 test tokens while its 16-bit setting was exact)."""

import copy

import pytest

import effml
from effml.core.data import load_text


def _ppl(model, tok, ids):
    return effml.perplexity(model, tok, ids, seq_len=ids.numel(), progress=False)


@pytest.mark.real_model
def test_gemma3_quarot_w4a4_beats_rtn_w4a4(gemma3_pristine):
    model, tok = gemma3_pristine
    ids = tok(load_text("wikitext2", "test")[:4000], return_tensors="pt").input_ids[0, :256]
    fp = _ppl(model, tok, ids)
    ppl = {}
    for name, method, kw in [("rtn", "rtn", {}), ("quarot", "quarot", {"w_mse": False})]:
        m = copy.deepcopy(model)
        effml.quantize(m, method, w_bits=4, a_bits=4, **kw)
        ppl[name] = _ppl(m, tok, ids)
        del m
    print(f"FP {fp:.2f}, W4A4: {ppl}")
    assert ppl["quarot"] < ppl["rtn"], ppl
    # with folded norm gains this was ~1e7 x FP (W4A4 RTN is ~1e3 x)
    assert ppl["quarot"] < 20 * fp, (fp, ppl)
