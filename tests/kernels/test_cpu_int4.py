"""CPU int4-pack path of QuantLinear against the reference torch path (odd shapes, both
precisions, per group and per channel, fallback)."""

import logging

import pytest
import torch
import torch.nn as nn
from effml.kernels import cpu_int4, cpu_weight_only_dtype, dispatch, use_kernels

from effml.quant.qlinear import QuantLinear


def test_this_torch_has_the_int4_pack_kernel():
    # run.sh pins torch 2.13, which has it; without it every int4 layer would take the slow path
    assert cpu_int4.available()


U32 = 2.0**-24  # float32 unit roundoff
U16 = 2.0**-8  # bfloat16 unit roundoff (8-bit significand)


def _layer(k, n, bits=4, sym=True, group=None, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(k, n)
    q = QuantLinear.from_linear(lin)
    q.set_quantized_weight(lin.weight.detach(), bits, sym, group)
    return q


def _abs_product(x, q):
    """|x| @ |W|ᵀ in float64: the scale of every rounding error of the dot products."""
    return x.double().abs() @ q.dequantized_weight().double().abs().T


def test_kernel_convention_is_c_minus_8_times_s_plus_z():
    """The documented formula, checked numerically: w = (c - 8) * s + z per group."""
    torch.manual_seed(1)
    n, k, g = 32, 128, 32
    codes = torch.randint(0, 16, (n, k))
    sz = torch.stack([torch.rand(k // g, n) + 0.5, torch.randn(k // g, n)], -1).contiguous()
    x = torch.randn(5, k)
    y = cpu_int4.matmul(x, cpu_int4.pack(codes), g, sz).double()
    ref = x.double() @ cpu_int4.dequantize_reference(codes, sz, g).double().T
    bound = k * U32 * (x.double().abs() @ cpu_int4.dequantize_reference(codes, sz, g).double().abs().T)
    assert ((y - ref).abs() <= bound + 1e-6).all()


@pytest.mark.parametrize("m", [1, 7, 33])
@pytest.mark.parametrize("k,n", [(576, 192), (576, 1536), (1536, 576)])
@pytest.mark.parametrize("sym,group", [(True, None), (False, 64)])
def test_int4_matches_reference(m, k, n, sym, group):
    q = _layer(k, n, 4, sym, group, seed=m + k + n)
    x = torch.randn(m, k)
    with torch.no_grad():
        with use_kernels("torch"):
            ref = q(x).double()
        exact = _abs_product(x, q)
        dispatch.calls.clear()
        with cpu_weight_only_dtype(torch.float32):
            y32 = q(x).double()
        y16 = q(x).double()
    assert dispatch.calls["cpu_int4"] == 2 and dispatch.calls["torch"] == 0
    # float32: the reference weight exactly, only the summation order differs (gamma_K bound, both sides)
    assert ((y32 - ref).abs() <= 2 * k * U32 * exact + 1e-6).all()
    # bfloat16: x and the scales (and zero offsets) rounded once each, the output once
    scale_err = 3 * U16 * exact + U16 * ref.abs() + 2 * k * U32 * exact
    assert ((y16 - ref).abs() <= scale_err + 1e-5).all()


def test_packed_once_and_no_dense_copy():
    q = _layer(576, 192, group=64)
    x = torch.randn(3, 576)
    with torch.no_grad():
        q(x)
        packed = q._kernel_cache["packed"]
        q(x)
    assert q._kernel_cache["packed"] is packed  # reused, not repacked per call
    assert q._deq is None
    assert "packed" not in str(list(q.state_dict()))


def test_unsupported_group_falls_back_with_one_line(caplog):
    q = _layer(576, 192, group=48)  # the kernel takes 32, 64, 128, 256
    x = torch.randn(7, 576)
    with torch.no_grad(), caplog.at_level(logging.INFO, logger="effml.kernels.dispatch"):
        dispatch.calls.clear()
        y = q(x)
        q(x)
        with use_kernels("torch"):
            ref = q(x)
    lines = [r for r in caplog.records if "group_size=48" in r.getMessage()]
    assert len(lines) == 1 and "int4-pack" in lines[0].getMessage()
    assert dispatch.calls["torch"] == 3 and torch.equal(y, ref)


def test_odd_output_width_per_channel_takes_the_int8_kernel():
    q = _layer(576, 200)  # 200 is not a multiple of 16: no int4-pack, but per channel fits int8
    x = torch.randn(7, 576)
    with torch.no_grad(), cpu_weight_only_dtype(torch.float32):
        with use_kernels("torch"):
            ref = q(x).double()
        dispatch.calls.clear()
        y = q(x).double()
    assert dispatch.calls["cpu_int8w"] == 1
    assert ((y - ref).abs() <= 2 * 576 * U32 * _abs_product(x, q) + 1e-6).all()


def test_prefill_rows_use_a_transient_dense_weight():
    q = _layer(576, 192, group=32)
    x = torch.randn(dispatch.PREFILL_ROWS + 1, 576)
    with torch.no_grad():
        with use_kernels("torch"):
            ref = q(x)
        dispatch.calls.clear()
        y = q(x)
    assert dispatch.calls["cpu_dequant"] == 1 and q._deq is None
    torch.testing.assert_close(y, ref, rtol=0, atol=0)
