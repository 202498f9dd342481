"""Integer CPU paths built on int8 codes:

* weight-only 5..8-bit (and per-channel 2..4-bit layers the int4-pack kernel cannot take):
  ``aten._weight_int8pack_mm(x, w_int8 [N, K], scales [N])`` = ``x @ (w * s)ᵀ``;
* quantized activations (W8A8, W4A8, W4A4, ...): per-token symmetric quantization exactly as
  ``ActQuantizer`` does it, ``torch._int_mm`` on the int8 codes (4-bit codes are exact in int8)
  giving int32 accumulators, then the Triton kernels' epilogue
  ``acc * a_scale[m] * w_scale[n] + bias[n]`` in float32.

Weights are per output channel: ``w = (c - zp) * s`` with ``c - zp`` in [-128, 127] (symmetric
up to 8 bits, asymmetric up to 7). For 8-bit symmetric weights the kernels read QuantLinear's
``qweight`` in place (``pack_codes`` stores those codes as int8 bytes, see
:func:`stored_signed_codes`); any other layout gets an int8 matrix built once and kept in memory
only (never saved).
"""

from __future__ import annotations

import torch


def available_int8pack() -> bool:
    return hasattr(torch.ops.aten, "_weight_int8pack_mm")


def available_int_mm() -> bool:
    return hasattr(torch, "_int_mm")


def weight_codes_fit(w_bits: int, w_sym: bool) -> tuple[bool, str]:
    """Whether ``c - zp`` fits in int8."""
    if w_sym or w_bits <= 7:
        return True, ""
    return False, "asymmetric 8-bit weights need 9-bit signed codes"


def codes_in_place(w_bits: int, w_sym: bool) -> bool:
    """Whether the stored ``qweight`` bytes, read as int8, already are ``c - zp``."""
    return w_bits == 8 and w_sym


# bytes: torch's own CPU allocations are 64-byte aligned, safetensors' loaded tensors only 8, and
# _weight_int8pack_mm's bfloat16 path segfaults on a weight that is not 16-byte aligned (seen
# with torch 2.13 on AVX-512); 64 covers any vector width
ALIGN = 64


def stored_signed_codes(qweight: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """int8 [N, K] view (no copy) of an 8-bit symmetric ``qweight``: ``pack_codes`` stores
    ``c ^ 0x80``, which is ``c - 128`` as an int8. The kernels only read it.

    A ``qweight`` that is not ``ALIGN``-byte aligned (e.g. loaded from safetensors) is moved
    into aligned memory first, in place: the tensor object stays the same (its version counter
    bumps), so modules sharing the buffer keep sharing it and the old memory is freed.
    """
    if qweight.data_ptr() % ALIGN:
        with torch.no_grad():
            qweight.set_(qweight.clone(memory_format=torch.contiguous_format))
    return qweight.view(torch.int8).view(n, k)


def signed_codes(codes: torch.Tensor, zero_points: torch.Tensor) -> torch.Tensor:
    """Unsigned codes [N, K] minus the per-channel zero point [N, 1] -> int8 [N, K]."""
    return (codes.to(torch.int16) - zero_points.to(torch.int16).reshape(-1, 1)).to(torch.int8).contiguous()


def int8_weight_matmul(x: torch.Tensor, w_int8: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``x [M, K] @ (w_int8 * scales[:, None])ᵀ`` -> [M, N]; ``scales`` in x's dtype."""
    return torch.ops.aten._weight_int8pack_mm(x.contiguous(), w_int8, scales)


def quantize_rows(x: torch.Tensor, bits: int, clip) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token symmetric codes (int8 [M, K]) and scales ([M, 1]) with the very operations of
    ``quantizers.fake_quant_rows`` (same dtype, same order), so ``codes * scale`` equals
    ``ActQuantizer(bits, sym=True, clip)(x)`` bit for bit."""
    from effml.quant.quantizers import qrange, scale_zero

    xmax = x.amax(dim=-1, keepdim=True) * clip
    xmin = x.amin(dim=-1, keepdim=True) * clip
    scale, _ = scale_zero(xmin, xmax, bits, True)
    lo, hi = qrange(bits, True)
    q = torch.clamp(torch.round(x / scale), lo, hi)
    return q.to(torch.int8), scale


def int_mm(a: torch.Tensor, w_t: torch.Tensor) -> torch.Tensor:
    """int8 [M, K] x int8 [K, N] -> exact int32 [M, N]."""
    return torch._int_mm(a, w_t)


def epilogue(acc: torch.Tensor, a_scale: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
             out_dtype: torch.dtype) -> torch.Tensor:
    """The Triton kernels' epilogue (kernels/int4_gemm.py): float32 ``acc * sa * sw (+ bias)``."""
    c = acc.float() * a_scale.float().reshape(-1, 1) * w_scale.reshape(1, -1)
    if bias is not None:
        c = c + bias.reshape(1, -1)
    return c.to(out_dtype)


def quantized_matmul(x: torch.Tensor, bits: int, clip, w_t: torch.Tensor, w_scale: torch.Tensor,
                     bias: torch.Tensor | None) -> torch.Tensor:
    """Quantize ``x`` [M, K] per token, multiply the int8 codes by ``w_t`` [K, N], rescale."""
    q, s = quantize_rows(x, bits, clip)
    return epilogue(int_mm(q, w_t), s, w_scale, bias, x.dtype)
