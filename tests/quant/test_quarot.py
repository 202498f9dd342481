import copy

import pytest
import torch

from effml.quant import quantize
from effml.quant.hadamard import hadamard, near_square_factors, random_hadamard
from effml.testing import random_ids, tiny_model


@pytest.mark.parametrize("n", [9, 64, 576, 1536])
def test_random_hadamard_is_orthogonal(n):
    q = random_hadamard(n, torch.Generator().manual_seed(0))
    torch.testing.assert_close(q @ q.T, torch.eye(n, dtype=q.dtype), rtol=0, atol=1e-10)
    if n == 64:  # a pure (signed, scaled) Hadamard: every entry has magnitude 1/sqrt(n)
        assert torch.allclose(q.abs(), torch.full_like(q, n**-0.5))
    h = hadamard(8)
    assert torch.equal(h @ h.T, 8 * torch.eye(8, dtype=h.dtype))


def test_near_square_factors():
    assert near_square_factors(576) == (24, 24)
    assert near_square_factors(1536) == (32, 48)
    assert near_square_factors(13) == (1, 13)


def _outlier_model():
    model = tiny_model("llama", hidden_size=128, intermediate_size=256)
    with torch.no_grad():  # a few massive channels, as in real LLM activations
        for layer in model.model.layers:
            layer.input_layernorm.weight[:3] *= 40
            layer.post_attention_layernorm.weight[5:7] *= 40
    return model


def test_quarot_beats_rtn_with_outlier_channels():
    base = _outlier_model()
    ids = random_ids(base, 4, 32)
    ref = base(ids).logits
    errs = {}
    for method in ("rtn", "quarot"):
        m = copy.deepcopy(base)
        quantize(m, method, w_bits=4, a_bits=4, kv_bits=4)
        errs[method] = ((m(ids).logits - ref) ** 2).mean().item()
    assert errs["quarot"] < 0.75 * errs["rtn"], errs
