"""Packed int4 x packed int4 GEMM (Triton, interpreted) against the torch reference and against
an int64 product of codes decoded by the library's own unpack_codes.

Bit-exact: the int32 accumulators, and (same float32 epilogue order) the float32 outputs.
fp16 / bf16 outputs: within 1e-3 / 1e-2 of the output scale (one bf16 rounding is up to 0.4%).
"""

import pytest
import torch
from effml.kernels.int4_gemm import CONFIGS, int4_gemm, int4_gemm_reference
from kernel_helpers import KS, MS, NS, TOL, random_packed, rel_err

from effml.quant.quantizers import unpack_codes

INT32_POISON = -(2**31)  # |sum| <= 64 K, so a real accumulator never takes this value


def int64_oracle(a_packed, w_packed):
    """Codes through QuantLinear's unpacking (flat layout, offset 8), multiplied in int64."""
    m, kh = a_packed.shape
    n = w_packed.shape[0]
    qa = unpack_codes(a_packed.reshape(-1), 4, (m, 2 * kh)).long() - 8
    qw = unpack_codes(w_packed.reshape(-1), 4, (n, 2 * kh)).long() - 8
    return qa @ qw.T


def scales(m, n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(m, generator=g) * 0.1 + 1e-3, (torch.rand(n, generator=g) * 0.02 + 1e-3).half()


@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("m", MS)
def test_accumulators_bit_exact_and_fully_written(m, k, n):
    a, w = random_packed(m, k, seed=m), random_packed(n, k, seed=n + k)
    out = torch.full((m, n), INT32_POISON, dtype=torch.int32)
    acc = int4_gemm(a, torch.ones(m), w, torch.ones(n), out=out, out_int32=True)
    assert acc.data_ptr() == out.data_ptr()
    assert (acc != INT32_POISON).all()
    assert torch.equal(acc.long(), int64_oracle(a, w))
    assert torch.equal(acc, int4_gemm_reference(a, torch.ones(m), w, torch.ones(n), out_int32=True))


@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("m", MS)
def test_dequantized_output_float32(m, k, n):
    a, w = random_packed(m, k, seed=2 * m), random_packed(n, k, seed=n)
    sa, sw = scales(m, n, seed=k)
    bias = torch.randn(n)
    out = torch.full((m, n), float("nan"))
    c = int4_gemm(a, sa, w, sw, bias=bias, out_dtype=torch.float32, out=out)
    assert torch.isfinite(out).all()
    ref = int4_gemm_reference(a, sa, w, sw, bias=bias, out_dtype=torch.float32)
    assert torch.equal(c, ref)
    # independent float64 oracle: (sum qa qw) * sa * sw + bias
    exact = int64_oracle(a, w).double() * sa.double()[:, None] * sw.double()[None, :] + bias.double()
    assert rel_err(c, exact) <= 1e-6


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", MS)
def test_half_precision_outputs(m, dtype):
    k, n = 1536, 576
    a, w = random_packed(m, k, seed=m), random_packed(n, k, seed=1)
    sa, sw = scales(m, n, seed=m)
    bias = torch.randn(n)
    out = torch.full((m, n), float("nan"), dtype=dtype)
    c = int4_gemm(a, sa, w, sw, bias=bias, out_dtype=dtype, out=out)
    assert torch.isfinite(c).all() and c.dtype == dtype
    assert torch.equal(c, int4_gemm_reference(a, sa, w, sw, bias=bias, out_dtype=dtype))  # same rounding
    exact = int4_gemm_reference(a, sa, w, sw, bias=bias, out_dtype=torch.float32)
    assert rel_err(c, exact) <= TOL[dtype]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "x".join(str(v) for v in c.kwargs.values()))
def test_every_autotune_config(cfg):
    """What a GPU may pick must be right too: each config on an odd shape (M, N, K tails)."""
    m, k, n = 33, 576, 192
    a, w = random_packed(m, k, seed=5), random_packed(n, k, seed=6)
    out = torch.full((m, n), INT32_POISON, dtype=torch.int32)
    int4_gemm(a, torch.ones(m), w, torch.ones(n), out=out, out_int32=True, config=cfg)
    assert torch.equal(out.long(), int64_oracle(a, w))


def test_bad_inputs_raise_clear_errors():
    a, w = random_packed(4, 576, 0), random_packed(8, 576, 1)
    with pytest.raises(ValueError, match="packed codes"):
        int4_gemm(a, torch.ones(4), random_packed(8, 578, 1), torch.ones(8))
    with pytest.raises(ValueError, match="one activation scale per token"):
        int4_gemm(a, torch.ones(3), w, torch.ones(8))
    with pytest.raises(ValueError, match="out_dtype"):
        int4_gemm(a, torch.ones(4), w, torch.ones(8), out_dtype=torch.float64)
    with pytest.raises(ValueError, match="out must be"):
        int4_gemm(a, torch.ones(4), w, torch.ones(8), out=torch.empty(4, 8, dtype=torch.float16),
                  out_dtype=torch.float32)
