import copy

import pytest
import torch

from effml.quant import quantize
from effml.quant.smoothquant import smoothing_scale
from effml.testing import random_ids, tiny_model


def test_smoothing_scale_formula():
    x, w = torch.tensor([4.0, 1.0, 0.25]), torch.tensor([1.0, 4.0, 1.0])
    torch.testing.assert_close(smoothing_scale(x, w, 0.5), (x.sqrt() / w.sqrt()))
    torch.testing.assert_close(smoothing_scale(x, w, 1.0), x)


def test_smoothquant_w8a8_beats_rtn_with_outlier_channels():
    base = tiny_model("llama", hidden_size=128, intermediate_size=256)
    with torch.no_grad():
        for layer in base.model.layers:
            layer.input_layernorm.weight[:3] *= 40
            layer.post_attention_layernorm.weight[5:7] *= 40
    ids = random_ids(base, 4, 32)
    ref = base(ids).logits
    errs = {}
    for method in ("rtn", "smoothquant"):
        m = copy.deepcopy(base)
        quantize(m, method, w_bits=8, a_bits=8, calib=ids)
        errs[method] = ((m(ids).logits - ref) ** 2).mean().item()
    assert errs["smoothquant"] < 0.3 * errs["rtn"], errs


def test_alpha_validated():
    with pytest.raises(ValueError, match="alpha must be in"):
        quantize(tiny_model("llama"), "smoothquant", alpha=1.5, calib=None)
