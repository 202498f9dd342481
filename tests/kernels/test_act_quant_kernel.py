"""Fused transform + per-token int4 quantization + packing (Triton, interpreted) against the torch
reference, and the reference against the library's own ActQuantizer / KroneckerTransform / pack_codes.

What is bit-exact: given the same transformed input, packed codes and scales (float32) are equal
bit for bit. The fused kernel (transform inside) is checked the same way here, because its
products and the reference's round identically on these inputs; the test still allows a code to
move by one step on a tiny fraction of entries, which is what a different float summation order
in the transform can do at a .5 boundary, and then requires the scales to agree to 1e-6.
"""

import pytest
import torch
from effml.kernels.act_quant import (
    quantize_reference,
    transform_quant,
    transform_quant_reference,
    transform_reference,
)
from kernel_helpers import KS, MS, activations, factors

from effml.quant.act import ActQuantizer
from effml.quant.quantizers import pack_codes
from effml.quant.transforms import KroneckerTransform


def unpack(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack([packed & 0x0F, packed >> 4], dim=-1).reshape(packed.shape[0], -1).to(torch.int32) - 8


@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("m", MS)
def test_codes_bit_exact_given_transformed_input(m, k):
    left, right = factors(k, seed=k + m)
    y = transform_reference(activations(m, k, seed=m), left, right)
    out = torch.full((m, k // 2), 0xA5, dtype=torch.uint8)
    scales = torch.full((m,), float("nan"))
    packed, s = transform_quant(y, None, None, clip=0.9, out=out, scales_out=scales)
    assert packed.data_ptr() == out.data_ptr() and s.data_ptr() == scales.data_ptr()
    ref_packed, ref_s = quantize_reference(y, 0.9)
    assert torch.equal(packed, ref_packed)
    assert torch.equal(s, ref_s)
    # independent anchor: the library's per-token fake quantizer and its packing layout
    fq = ActQuantizer(4, sym=True, clip=0.9)(y)
    assert torch.equal(unpack(packed).float() * s[:, None], fq)
    codes = (unpack(packed) + 8).to(torch.uint8)
    assert torch.equal(packed.reshape(-1), pack_codes(codes, 4))


@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("m", MS)
def test_fused_transform_quant_matches_reference(m, k):
    left, right = factors(k, seed=k)
    smul = 0.5 + torch.rand(k, generator=torch.Generator().manual_seed(m))
    x = activations(m, k, seed=m + 1)
    clip = torch.sigmoid(torch.tensor(2.0)).item()  # a learned ratio, as FlatQuant's LAC leaves it
    packed, s = transform_quant(x, left, right, clip=clip, smul=smul)
    ref_packed, ref_s = transform_quant_reference(x, left, right, clip=clip, smul=smul)
    diff = (unpack(packed) - unpack(ref_packed)).abs()
    assert diff.max() <= 1 and diff.float().mean() <= 1e-3
    torch.testing.assert_close(s, ref_s, rtol=1e-6, atol=0)
    # the reference is QuantLinear's own transform + quantizer (learnable clip, same logit)
    t = KroneckerTransform.from_factors(left, right, k, scale=smul)
    aq = ActQuantizer(4, sym=True, learnable=True)
    with torch.no_grad():
        aq.clip_logit.fill_(2.0)
        fq = aq(t(x))
    assert torch.equal(unpack(ref_packed).float() * ref_s[:, None], fq)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs(dtype):
    k, m = 576, 7
    left, right = factors(k, seed=3)
    x = activations(m, k, seed=3, dtype=dtype)
    packed, s = transform_quant(x, left, right, clip=1.0)
    ref_packed, ref_s = transform_quant_reference(x, left, right, clip=1.0)
    diff = (unpack(packed) - unpack(ref_packed)).abs()
    assert diff.max() <= 1 and diff.float().mean() <= 1e-3
    torch.testing.assert_close(s, ref_s, rtol=1e-6, atol=0)


@pytest.mark.parametrize("case", ["left-only (o_proj: heads x head_dim)", "right-only", "no factors"])
def test_identity_factors(case):
    k, m = 576, 33
    left, right = torch.linalg.qr(torch.randn(9, 9, generator=torch.Generator().manual_seed(0)))[0], None
    if case == "right-only":
        left, right = None, factors(k)[1]
    elif case == "no factors":
        left = None
    x = activations(m, k, seed=5)
    packed, s = transform_quant(x, left, right, clip=0.95)
    ref_packed, ref_s = transform_quant_reference(x, left, right, clip=0.95)
    assert (unpack(packed) - unpack(ref_packed)).abs().max() <= 1
    torch.testing.assert_close(s, ref_s, rtol=1e-6, atol=0)


def test_ties_round_half_to_even():
    """torch.round sends x.5 to the even neighbour; with absmax 7 (scale exactly 1) every
    half-integer below is a tie."""
    halves = torch.arange(-6.5, 7.0, 1.0)  # -6.5 .. 6.5
    y = torch.cat([torch.tensor([7.0]), halves, torch.zeros(576 - 1 - halves.numel())])[None].repeat(3, 1)
    packed, s = transform_quant(y, None, None, clip=1.0)
    assert torch.equal(s, torch.ones(3))
    codes = unpack(packed)[0, 1:1 + halves.numel()]
    assert torch.equal(codes.float(), torch.round(halves).clamp(-8, 7))
    assert torch.equal(packed, quantize_reference(y, 1.0)[0])


@pytest.mark.parametrize("bits", [2, 3])
def test_lower_bit_widths(bits):
    x = activations(7, 576, seed=bits)
    packed, s = transform_quant(x, None, None, clip=1.0, bits=bits)
    ref_packed, ref_s = quantize_reference(x, 1.0, bits)
    assert torch.equal(packed, ref_packed) and torch.equal(s, ref_s)
    assert int((packed & 0x0F).max()) < 2**bits and int((packed >> 4).max()) < 2**bits


def test_every_output_byte_is_written():
    """Two launches into buffers poisoned with different fill values must agree everywhere."""
    k, m = 1536, 33
    left, right = factors(k)
    x = activations(m, k)
    results = []
    for fill in (0x00, 0xFF):
        out = torch.full((m, k // 2), fill, dtype=torch.uint8)
        scales = torch.full((m,), float("nan") if fill else -1.0)
        transform_quant(x, left, right, clip=0.9, out=out, scales_out=scales)
        results.append((out.clone(), scales.clone()))
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1]) and torch.isfinite(results[0][1]).all()


def test_bad_inputs_raise_clear_errors():
    x = torch.randn(4, 576)
    left, right = factors(576)
    with pytest.raises(ValueError, match="does not match"):
        transform_quant(x, torch.eye(25), None)
    with pytest.raises(ValueError, match="clip"):
        transform_quant(x, left, right, clip=1.5)
    with pytest.raises(ValueError, match="odd size"):
        transform_quant(torch.randn(2, 18), torch.eye(6), torch.eye(3))
    with pytest.raises(ValueError, match="2, 3 or 4"):
        transform_quant(x, left, right, bits=8)
    with pytest.raises(ValueError, match="2-D"):
        transform_quant(x.double(), left, right)
    with pytest.raises(ValueError, match="out must be"):
        transform_quant(x, left, right, out=torch.empty(4, 287, dtype=torch.uint8))
