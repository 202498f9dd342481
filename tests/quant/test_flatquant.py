import copy

import pytest
import torch
import torch.nn.functional as F

from effml.quant import quantize
from effml.quant.flat_params import FlatLinear, FlatTransform, OrthoFactor
from effml.quant.flatquant import FlatQuantConfig
from effml.quant.hadamard import random_orthogonal
from effml.testing import random_ids, tiny_model


def _perturbed(n, seed):
    g = torch.Generator().manual_seed(seed)
    f = OrthoFactor(random_orthogonal(n, g))
    with torch.no_grad():
        f.skew_u.copy_(torch.randn(n, n, generator=g) * 0.3)
        f.skew_v.copy_(torch.randn(n, n, generator=g) * 0.3)
        f.sigma.copy_(torch.rand(n, generator=g) + 0.5)
    return f


@pytest.mark.parametrize("n", [3, 5, 9])
def test_svd_factor_inverse_is_exact_on_odd_sizes(n):
    f = _perturbed(n, n)
    p, inv_t = f.matrix().double(), f.inv_t().double()
    assert (p @ inv_t.T - torch.eye(n, dtype=p.dtype)).abs().max() < 1e-5
    u = f.base @ __import__("effml.quant.flat_params", fromlist=["cayley"]).cayley(f.skew_u)
    assert (u @ u.T - torch.eye(n)).abs().max() < 1e-5


def test_kronecker_transform_then_merged_weight_is_identity_map():
    t = FlatTransform(_perturbed(3, 1), _perturbed(5, 2), scale=torch.rand(15) + 0.5)
    w, x = torch.randn(7, 15), torch.randn(4, 15)
    torch.testing.assert_close(F.linear(t(x), t.merge_weight(w)), F.linear(x, w), rtol=0, atol=1e-4)


def test_value_and_heads_transforms_cancel_through_attention_values():
    """v_proj outputs carry P_v per head, o_proj gets (P_o ⊗ P_v)^{-T}: o(v(x)) is unchanged."""
    heads, hd, hidden = 3, 5, 12
    torch.manual_seed(0)
    wv, wo = torch.randn(heads * hd, hidden), torch.randn(hidden, heads * hd)
    p_v, p_o = _perturbed(hd, 3), _perturbed(heads, 4)
    v = FlatLinear(wv, None, None, None, None, 16, True, None, False, out_factor=p_v, out_rows=slice(None), head_dim=hd)
    o = FlatLinear(wo, None, FlatTransform(p_o, None), FlatTransform(p_o, p_v), None, 16, True, None, False)
    x = torch.randn(6, hidden)
    torch.testing.assert_close(o(v(x)), x @ wv.T @ wo.T, rtol=1e-4, atol=1e-4)


def test_calibration_lowers_block_loss_and_beats_rtn():
    base = tiny_model("llama", hidden_size=128, intermediate_size=256)
    with torch.no_grad():
        for layer in base.model.layers:
            layer.input_layernorm.weight[:3] *= 40
    calib, test = random_ids(base, 4, 32), random_ids(base, 4, 32, seed=1)
    ref = base(test).logits
    errs = {}
    for method, kw in (("rtn", {}), ("flatquant", {"epochs": 3})):
        m = copy.deepcopy(base)
        quantize(m, method, w_bits=4, a_bits=4, kv_bits=4, calib=calib, **kw)
        errs[method] = ((m(test).logits - ref) ** 2).mean().item()
    blocks = m.effml_report["flatquant_blocks"]
    # 4 batches an epoch is noisy block by block; over the model the loss must go down
    assert sum(b["loss_last_epoch"] for b in blocks) < sum(b["loss_first_epoch"] for b in blocks)
    assert errs["flatquant"] < 0.5 * errs["rtn"], errs


def test_presets_and_validation():
    assert FlatQuantConfig.build(preset="paper").epochs == 15
    assert FlatQuantConfig.build(preset="paper", epochs=2).n_samples == 128
    with pytest.raises(ValueError, match="preset must be one of"):
        FlatQuantConfig.build(preset="fast")
    with pytest.raises(ValueError, match="init must be one of"):
        FlatQuantConfig.build(init="identity")


@pytest.mark.parametrize("weight_quantizer", ["rtn", "gptq"])
def test_deferred_weights_then_finish_equals_one_shot(weight_quantizer):
    """One transform calibration finished later by RTN or GPTQ is the same model as the one-shot call."""
    from effml.quant import finish_weights

    base = tiny_model("llama", hidden_size=64, intermediate_size=128)
    calib, test = random_ids(base, 2, 16), random_ids(base, 2, 16, seed=1)
    kw = dict(w_bits=4, a_bits=4, kv_bits=4, calib=calib, epochs=1, n_samples=2, seq_len=16)
    one = quantize(copy.deepcopy(base), "flatquant", weight_quantizer=weight_quantizer, **kw)
    two = quantize(copy.deepcopy(base), "flatquant", quantize_weights=False, **kw)
    assert two.effml_report["weight_quantizer"] == "deferred"
    finish_weights(two, weight_quantizer, calib)
    assert two.effml_report["weight_quantizer"] == weight_quantizer
    assert two.effml_report["linear_bits_per_weight"] == one.effml_report["linear_bits_per_weight"]
    torch.testing.assert_close(two(test).logits, one(test).logits, rtol=0, atol=0)
    with pytest.raises(ValueError, match="quantize_weights=False"):
        finish_weights(two, "rtn", calib)


@pytest.mark.parametrize("propagate", ["original", "both"])
def test_block_targets_are_the_full_precision_model(monkeypatch, propagate):
    """The training targets (and, with propagate="original", the next block's inputs) are the
    unquantized model's hidden states: arming every quantizer before calibration once made them
    an untransformed W16A4KV4 model's outputs (17% of their scale off on this tiny model)."""
    import effml.quant.flatquant as fq

    base = tiny_model("llama")
    calib = random_ids(base, 2, 32)
    hidden = base(calib, output_hidden_states=True).hidden_states
    seen = {}
    real = fq._calibrate_block

    def spy(ctx, model, cfg, g):
        seen[ctx.index] = (torch.cat(ctx.fp_outputs), torch.cat(ctx.inputs))
        return real(ctx, model, cfg, g)

    monkeypatch.setattr(fq, "_calibrate_block", spy)
    m = copy.deepcopy(base)
    quantize(m, "flatquant", w_bits=4, a_bits=4, kv_bits=4, calib=calib, epochs=1, batch_size=2, propagate=propagate)
    assert len(seen) == base.config.num_hidden_layers
    for i, (targets, inputs) in seen.items():
        if i + 1 < len(hidden) - 1:  # HF's last hidden state has the final norm applied
            torch.testing.assert_close(targets, hidden[i + 1], rtol=1e-5, atol=1e-6)
        if propagate == "original" or i == 0:
            torch.testing.assert_close(inputs, hidden[i], rtol=1e-5, atol=1e-6)
        else:  # the quantized model's own inputs
            assert (inputs - hidden[i]).abs().max() > 1e-3 * hidden[i].abs().max()


def test_weights_in_loop_float_trains_no_weight_clipping():
    base = tiny_model("llama")
    calib = random_ids(base, 2, 16)
    m = quantize(copy.deepcopy(base), "flatquant", w_bits=4, a_bits=4, calib=calib, epochs=1, batch_size=2,
                 weights_in_loop="float", weight_quantizer="gptq")
    assert m.effml_report["config"]["weights_in_loop"] == "float"
    with pytest.raises(ValueError, match="weights_in_loop must be one of"):
        FlatQuantConfig.build(weights_in_loop="rtn")
    with pytest.raises(ValueError, match="propagate must be one of"):
        FlatQuantConfig.build(propagate="fp")
