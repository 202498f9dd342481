"""CPU int8 paths of QuantLinear: per-token activation codes identical to ActQuantizer's,
torch._int_mm accumulators bit-exact, outputs against the reference torch path."""

import pytest
import torch
import torch.nn as nn
from effml.kernels import cpu_int8, cpu_weight_only_dtype, dispatch, use_kernels

from effml.quant.act import ActQuantizer
from effml.quant.qlinear import QuantLinear
from effml.quant.quantizers import fake_quant_rows, unpack_codes

U32 = 2.0**-24


def _layer(k, n, w_bits, a_bits, w_sym=True, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(k, n)
    q = QuantLinear.from_linear(lin)
    q.set_quantized_weight(lin.weight.detach(), w_bits, w_sym, None)
    if a_bits < 16:
        q.act_quant = ActQuantizer(a_bits, sym=True)
    return q


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bits,clip", [(8, 1.0), (4, 0.9), (4, "learned")])
def test_activation_codes_are_actquantizer_bit_for_bit(dtype, bits, clip):
    torch.manual_seed(0)
    x = (torch.randn(33, 576) * torch.rand(33, 1) * 10).to(dtype)
    aq = ActQuantizer(bits, sym=True, clip=1.0 if clip == "learned" else clip, learnable=clip == "learned")
    q, s = cpu_int8.quantize_rows(x, bits, aq.clip_ratio())
    assert q.dtype == torch.int8 and int(q.int().abs().max()) <= 2 ** (bits - 1)
    ref = fake_quant_rows(x, bits, True, aq.clip_ratio())
    assert torch.equal((q.to(s.dtype) * s).to(dtype), aq(x)) and torch.equal(aq(x), ref.to(dtype))


@pytest.mark.parametrize("m", [1, 7, 33])
@pytest.mark.parametrize("k,n", [(576, 192), (1536, 576), (576, 1536)])
def test_int_mm_accumulators_are_exact(m, k, n):
    g = torch.Generator().manual_seed(m * k + n)
    a = torch.randint(-128, 128, (m, k), generator=g, dtype=torch.int8)
    w = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
    acc = cpu_int8.int_mm(a, w.t())
    assert acc.dtype == torch.int32 and torch.equal(acc.long(), a.long() @ w.long().T)


@pytest.mark.parametrize("m", [1, 7, 33])
@pytest.mark.parametrize("k,n", [(576, 192), (1536, 576), (576, 1536)])
@pytest.mark.parametrize("w_bits,a_bits,w_sym", [(8, 8, True), (4, 8, False), (4, 4, True)])
def test_quantized_activations_match_reference(m, k, n, w_bits, a_bits, w_sym):
    q = _layer(k, n, w_bits, a_bits, w_sym, seed=m + n)
    x = torch.randn(m, k)
    with torch.no_grad():
        with use_kernels("torch"):
            ref = q(x).double()
            xq = q.prepare_input(x).double()  # the reference's fake-quantized activation
        dispatch.calls.clear()
        y = q(x).double()
    assert dispatch.calls["cpu_intmm"] == 1
    # the module's integer accumulators equal the float64 product of the reference's codes
    codes_a, scale_a = cpu_int8.quantize_rows(x, a_bits, 1.0)
    w8 = q._kernel_cache["w8"]
    zp = 2 ** (w_bits - 1) if w_sym else q.zeros.long()
    ref_codes_w = unpack_codes(q.qweight, w_bits, (n, k)).long() - zp
    assert torch.equal(w8.long(), ref_codes_w)
    assert torch.equal(cpu_int8.int_mm(codes_a, w8.t()).double(), codes_a.double() @ ref_codes_w.double().T)
    # float outputs: exact integer products, then float32 rounding of scales and the epilogue
    # on one side and of the reference's float32 GEMM (gamma_K) on the other
    bound = (k + 4) * U32 * (xq.abs() @ q.dequantized_weight().double().abs().T)
    assert ((y - ref).abs() <= bound + 1e-6).all()


@pytest.mark.parametrize("w_bits,w_sym", [(8, True), (6, False)])
def test_int8_weight_only(w_bits, w_sym):
    q = _layer(576, 192, w_bits, 16, w_sym)
    x = torch.randn(7, 576)
    with torch.no_grad():
        with use_kernels("torch"):
            ref = q(x).double()
        dispatch.calls.clear()
        with cpu_weight_only_dtype(torch.float32):
            y = q(x).double()
        yb = q(x).double()
    assert dispatch.calls["cpu_int8w"] == 2
    exact = x.double().abs() @ q.dequantized_weight().double().abs().T
    assert ((y - ref).abs() <= 2 * 576 * U32 * exact + 1e-6).all()
    assert ((yb - ref).abs() <= 2 * 2.0**-8 * exact + 2.0**-8 * ref.abs() + 1e-5).all()


def test_asymmetric_eight_bit_weights_fall_back():
    q = _layer(576, 192, 8, 8, w_sym=False)
    x = torch.randn(3, 576)
    with torch.no_grad():
        dispatch.calls.clear()
        y = q(x)
        with use_kernels("torch"):
            ref = q(x)
    assert dispatch.calls["torch"] == 2 and torch.equal(y, ref)
