"""Weight-only W4A16 GEMM (Triton, interpreted) against the torch reference, whose output is in
turn checked to be exactly QuantLinear's own forward on the same stored weights.

Floating outputs: within 1e-3 of the output scale for float32 / float16, 1e-2 for bfloat16.
"""

import pytest
import torch
from effml.kernels import use_kernels
from effml.kernels.w4a16_gemm import CONFIGS, w4a16_gemm, w4a16_gemm_reference
from kernel_helpers import KS, MS, NS, TOL, activations, rel_err

from effml.quant.qlinear import QuantLinear

LAYOUTS = {"sym-channel": (True, None), "sym-g64": (True, 64), "asym-channel": (False, None), "asym-g32": (False, 32)}


def quant_linear(k, n, sym, group_size, seed=0, bits=4):
    g = torch.Generator().manual_seed(seed)
    q = QuantLinear(k, n, bias=True)
    q.set_quantized_weight(torch.randn(n, k, generator=g) / k**0.5, bits, sym, group_size)
    with torch.no_grad():
        q.bias.copy_(torch.randn(n, generator=g))
    return q


def run(q, x, **kw):
    n, k = q.out_features, q.in_features
    return w4a16_gemm(x, q.qweight.view(n, k // 2), q.scales, None if q.w_sym else q.zeros, q.group_size, q.bias,
                      bits=q.w_bits, **kw)


def reference(q, x):
    n, k = q.out_features, q.in_features
    return w4a16_gemm_reference(x, q.qweight.view(n, k // 2), q.scales, None if q.w_sym else q.zeros, q.group_size,
                                q.bias, bits=q.w_bits)


@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("m", MS)
def test_matches_reference_on_odd_shapes(m, k, n):
    x = activations(m, k, seed=m + k)
    shape_index = (MS.index(m) * len(KS) + KS.index(k)) * len(NS) + NS.index(n)
    for i, (sym, gs) in enumerate(LAYOUTS.values()):
        if (shape_index + i) % 2:  # alternate halves of the layouts: quick, and every layout gets 9 shapes
            continue
        q = quant_linear(k, n, sym, gs, seed=i)
        out = torch.full((m, n), float("nan"))
        y = run(q, x, out=out)
        assert y.data_ptr() == out.data_ptr() and torch.isfinite(out).all()
        assert rel_err(y, reference(q, x)) <= TOL[torch.float32]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_reference_is_quantlinear_forward(layout):
    sym, gs = LAYOUTS[layout]
    q = quant_linear(576, 192, sym, gs, seed=3)
    x = activations(7, 576)
    # QuantLinear's torch path (auto mode on CPU takes the bf16 int4-pack kernel instead)
    with torch.no_grad(), use_kernels("torch"):
        expected = q(x)
    assert torch.equal(reference(q, x), expected)
    assert rel_err(run(q, x), expected) <= TOL[torch.float32]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["sym-channel", "asym-g32"])
def test_half_precision_activations(dtype, layout):
    sym, gs = LAYOUTS[layout]
    q = quant_linear(1536, 576, sym, gs, seed=4)
    x = activations(33, 1536, dtype=dtype) * 0.05
    out = torch.full((33, 576), float("nan"), dtype=dtype)
    y = run(q, x, out=out)
    assert y.dtype == dtype and torch.isfinite(y).all()
    assert rel_err(y, reference(q, x)) <= TOL[dtype]


@pytest.mark.parametrize("bits", [2, 3])
def test_lower_bit_weights(bits):
    q = quant_linear(576, 192, True, 64, seed=bits, bits=bits)
    x = activations(7, 576)
    assert rel_err(run(q, x), reference(q, x)) <= TOL[torch.float32]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "x".join(str(v) for v in c.kwargs.values()))
def test_every_autotune_config(cfg):
    q = quant_linear(576, 192, False, 64, seed=7)
    x = activations(33, 576)
    out = torch.full((33, 192), float("nan"))
    run(q, x, out=out, config=cfg)
    assert rel_err(out, reference(q, x)) <= TOL[torch.float32]


def test_bad_inputs_raise_clear_errors():
    q = quant_linear(576, 192, True, None)
    w = q.qweight.view(192, 288)
    with pytest.raises(ValueError, match="odd"):
        w4a16_gemm(torch.randn(2, 575), w, q.scales)
    with pytest.raises(ValueError, match=r"scales must be \[N, 9\]"):
        w4a16_gemm(torch.randn(2, 576), w, q.scales, group_size=64)
    with pytest.raises(ValueError, match="must be even and divide"):
        w4a16_gemm(torch.randn(2, 576), w, q.scales, group_size=7)
    with pytest.raises(ValueError, match="zeros must be uint8"):
        w4a16_gemm(torch.randn(2, 576), w, q.scales, zeros=torch.zeros(192, 1))
