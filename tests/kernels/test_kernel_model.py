"""QuantLinear on the kernels (forced with use_kernels("triton"), interpreted) against its own
torch path: single layers, tiny quantized models through effml.save / effml.load, and one whole
SmolLM2-135M W4A4 model (the slow kernel test)."""

import pytest
import torch
from effml.kernels import kernel_mode, use_kernels
from effml.kernels.dispatch import calls, plan
from kernel_helpers import factors, rel_err

import effml
from effml.quant.act import ActQuantizer
from effml.quant.qlinear import QuantLinear
from effml.quant.transforms import KroneckerTransform
from effml.testing import random_ids, tiny_model


def w4a4_layer(k=576, n=192, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = QuantLinear(k, n, bias=True)
    q.set_quantized_weight(torch.randn(n, k, generator=g) / k**0.5, 4, True, None)
    left, right = factors(k, seed)
    q.input_transform = KroneckerTransform.from_factors(left, right, k, scale=0.5 + torch.rand(k, generator=g))
    q.act_quant = ActQuantizer(4, sym=True, learnable=True)
    with torch.no_grad():
        q.bias.copy_(torch.randn(n, generator=g))
        q.act_quant.clip_logit.fill_(3.0)
    return q


def forward_counts(fn):
    before = dict(calls)
    out = fn()
    return out, {k: calls[k] - before.get(k, 0) for k in calls}


def test_modes():
    assert kernel_mode() == "auto"
    with use_kernels("torch"):
        assert kernel_mode() == "torch"
        with use_kernels("triton"):
            assert kernel_mode() == "triton"
        assert kernel_mode() == "torch"
    assert kernel_mode() == "auto"
    with pytest.raises(ValueError, match="kernel mode must be one of"):
        with use_kernels("cuda"):
            pass


def test_plan_says_what_is_supported():
    q = w4a4_layer()
    assert plan(q)[0] == "w4a4"
    q.act_quant = None
    assert plan(q)[0] == "w4a16"
    q.act_quant = ActQuantizer(4, sym=False)
    assert plan(q) == (None, "activations are 4-bit asym (kernels: 2..4-bit sym)")
    q.act_quant = ActQuantizer(8)
    assert plan(q)[0] is None
    q.act_quant = ActQuantizer(4)
    q.set_quantized_weight(torch.randn(192, 576), 4, True, 64)
    assert "per-channel" in plan(q)[1]
    q.set_quantized_weight(torch.randn(192, 576), 8, True, None)
    assert plan(q)[0] is None
    q.set_quantized_weight(torch.randn(192, 576), 16)
    assert plan(q)[0] is None


def test_w4a4_layer_forced_kernels_match_torch_path():
    q = w4a4_layer()
    x = torch.randn(2, 5, 576)  # leading dims are kept
    with torch.no_grad():
        ref = q(x)
        out, n = forward_counts(lambda: _forced(q, x))
    assert n.get("w4a4") == 1 and out.shape == ref.shape
    assert rel_err(out, ref) <= 1e-5
    # the cached float scales follow an in-place change of the stored ones
    with torch.no_grad():
        q.scales.mul_(2)
        torch.testing.assert_close(_forced(q, x), 2 * (ref - q.bias) + q.bias, rtol=1e-5, atol=1e-5)


def _forced(q, x):
    with use_kernels("triton"):
        return q(x)


def test_default_auto_mode_keeps_cpu_and_autograd_on_torch():
    q = w4a4_layer()
    x = torch.randn(3, 576)
    with torch.no_grad():
        _, n = forward_counts(lambda: q(x))  # auto on CPU
    assert n.get("w4a4", 0) == 0 and n.get("torch") == 1
    x.requires_grad_(True)
    out, n = forward_counts(lambda: _forced(q, x))  # kernels have no backward
    assert n.get("w4a4", 0) == 0
    out.sum().backward()
    assert x.grad is not None


def test_w4a16_layer_with_transform():
    q = w4a4_layer(k=1536, n=576, seed=1)
    q.act_quant = None
    x = torch.randn(7, 1536)
    with torch.no_grad():
        out, n = forward_counts(lambda: _forced(q, x))
        assert n.get("w4a16") == 1
        assert rel_err(out, q(x)) <= 1e-3


@pytest.mark.parametrize("method,bits", [("flatquant", {"a_bits": 4}), ("quarot", {"a_bits": 4}),
                                         ("gptq", {"group_size": 16})])
def test_tiny_model_saved_and_loaded_runs_on_kernels(method, bits, tmp_path):
    model = tiny_model("llama")
    calib = random_ids(model, 2, 16)
    extra = {"epochs": 1} if method == "flatquant" else {}
    model = effml.quantize(model, method, w_bits=4, calib=calib, n_samples=2, seq_len=16, **bits, **extra)
    effml.save(model, tmp_path / "q")
    loaded = effml.load(tmp_path / "q")
    ids = random_ids(model, 1, 7, seed=1)
    path = "w4a4" if "a_bits" in bits else "w4a16"
    with torch.no_grad():
        ref = model(ids).logits
        assert torch.equal(loaded(ids).logits, ref)  # default (auto on CPU): the torch path
        out, n = forward_counts(lambda: _forced(loaded, ids).logits)
    assert n.get(path) == 7 * 4 and n.get("torch", 0) == 0
    assert rel_err(out, ref) <= 1e-4
    assert torch.equal(out.argmax(-1), ref.argmax(-1))


@pytest.mark.slow
@pytest.mark.real_model
def test_smollm2_w4a4_logits_kernel_path_equals_reference(smollm2):
    """All 210 linears of SmolLM2-135M through the fused quantizer and the int4 GEMM
    (interpreted, 8 tokens): the logits are those of the torch path."""
    model, tok = smollm2
    calib = effml.calibration_data(tok, "wikitext2", n_samples=2, seq_len=16)
    model = effml.quantize(model, "flatquant", w_bits=4, a_bits=4, calib=calib, epochs=0, n_samples=2, seq_len=16)
    ids = tok("The capital of France is Paris, and the river", return_tensors="pt").input_ids[:, :8]
    with torch.no_grad():
        ref = model(ids).logits
        out, n = forward_counts(lambda: _forced(model, ids).logits)
    assert n.get("w4a4") == 7 * 30 and n.get("torch", 0) == 0
    assert rel_err(out, ref) <= 1e-3
    assert torch.equal(out.argmax(-1), ref.argmax(-1))
