"""W4A4 GEMM: packed int4 activations x packed int4 weights, int32 accumulation, and a
dequantization epilogue (per-token x per-channel scales, optional bias) to fp16 / bf16 / fp32.

    C[m, n] = (sum_k qa[m, k] * qw[n, k]) * sa[m] * sw[n] + bias[n]

Both operands use QuantLinear's stored layout read in place: codes unsigned (q + 2^(b-1)), two
per byte, even k in the low nibble, one row per token / output channel ([M, K/2], [N, K/2]).
No repacked weight copy is made.

Hopper has no int4 tensor-core instruction, so nibbles are unpacked to int8 in registers and
multiplied with int8 dots (also native on Ampere). Because activations and weights pack the
same k into the same nibble, sum_k = sum_{k even} + sum_{k odd}: one dot of the low nibbles
plus one of the high nibbles, and no interleaving is needed.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import (
    check_bits,
    check_device,
    check_out,
    check_packed,
    gemm_config,
    interpreted,
    launch_gemm,
    m_bucket,
    offset,
    round_to,
    tile_ids,
)


# --- torch reference ------------------------------------------------------------------------------
def unpack_signed(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """[R, K/2] packed bytes -> signed integer codes [R, K] (int32)."""
    lo = (packed & 0x0F).to(torch.int32)
    hi = (packed >> 4).to(torch.int32)
    return torch.stack([lo, hi], dim=-1).reshape(packed.shape[0], -1) - offset(bits)


def int4_gemm_reference(a_packed: torch.Tensor, a_scale: torch.Tensor, w_packed: torch.Tensor,
                        w_scale: torch.Tensor, bias: torch.Tensor | None = None,
                        out_dtype: torch.dtype = torch.float16, a_bits: int = 4, w_bits: int = 4,
                        out_int32: bool = False) -> torch.Tensor:
    """The integer product is computed in float64 (exact: |sum| <= 64 K << 2^53, and float64
    matmul works on every device), then the same float32 epilogue as the kernel."""
    qa = unpack_signed(a_packed, a_bits).double()
    qw = unpack_signed(w_packed, w_bits).double()
    acc = (qa @ qw.T).to(torch.int32)
    if out_int32:
        return acc
    c = acc.float() * a_scale.float()[:, None] * w_scale.float().reshape(-1)[None, :]
    if bias is not None:
        c = c + bias.float()[None, :]
    return c.to(out_dtype)


# --- Triton kernel -------------------------------------------------------------------------------
@triton.jit
def _int4_gemm_kernel(
    a_ptr, w_ptr, sa_ptr, sw_ptr, bias_ptr, c_ptr, M, N, KH, stride_am, stride_wn, stride_cm, M_BUCKET,
    A_OFF: tl.constexpr, W_OFF: tl.constexpr, HAS_BIAS: tl.constexpr, OUT_INT32: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KH: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = tile_ids(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_KH)
    a_ptrs = a_ptr + rm[:, None].to(tl.int64) * stride_am + rk[None, :]
    w_ptrs = w_ptr + rn[:, None].to(tl.int64) * stride_wn + rk[None, :]
    # padding bytes decode to code 0 in both nibbles, so they add nothing to the sum
    a_pad: tl.constexpr = A_OFF * 17
    w_pad: tl.constexpr = W_OFF * 17
    acc = tl.full((BLOCK_M, BLOCK_N), 0, dtype=tl.int32)
    for k0 in range(0, KH, BLOCK_KH):
        k_ok = (k0 + rk[None, :]) < KH
        a = tl.load(a_ptrs, mask=(rm[:, None] < M) & k_ok, other=a_pad)
        w = tl.load(w_ptrs, mask=(rn[:, None] < N) & k_ok, other=w_pad)
        a_lo = (a & 0x0F).to(tl.int8) - A_OFF
        a_hi = (a >> 4).to(tl.int8) - A_OFF
        w_lo = (w & 0x0F).to(tl.int8) - W_OFF
        w_hi = (w >> 4).to(tl.int8) - W_OFF
        acc = tl.dot(a_lo, tl.trans(w_lo), acc, out_dtype=tl.int32)
        acc = tl.dot(a_hi, tl.trans(w_hi), acc, out_dtype=tl.int32)
        a_ptrs += BLOCK_KH
        w_ptrs += BLOCK_KH

    c_ptrs = c_ptr + rm[:, None].to(tl.int64) * stride_cm + rn[None, :]
    c_mask = (rm[:, None] < M) & (rn[None, :] < N)
    if OUT_INT32:
        tl.store(c_ptrs, acc, mask=c_mask)
    else:
        sa = tl.load(sa_ptr + rm, mask=rm < M, other=0.0)
        sw = tl.load(sw_ptr + rn, mask=rn < N, other=0.0)
        c = acc.to(tl.float32) * sa[:, None] * sw[None, :]
        if HAS_BIAS:
            c = c + tl.load(bias_ptr + rn, mask=rn < N, other=0.0)[None, :]
        ot: tl.constexpr = c_ptr.dtype.element_ty
        tl.store(c_ptrs, round_to(c, ot, UPCAST).to(ot), mask=c_mask)


# Small set: decode (one M tile, narrow N for many programs), mid and large prefill tiles.
# BLOCK_KH counts packed bytes (2 * BLOCK_KH values of K); int8 dots need BLOCK_KH >= 32.
CONFIGS = [
    gemm_config(16, 64, 128, 4, 4),
    gemm_config(16, 128, 128, 4, 4),
    gemm_config(64, 128, 64, 4, 4),
    gemm_config(128, 128, 64, 8, 3),
    gemm_config(128, 256, 64, 8, 3),
    gemm_config(256, 128, 64, 8, 3),
]
# Interpreter: wide tiles (each interpreted op costs ~0.1 ms of Python, so fewer, larger
# programs are fastest); still narrower than N = 576 / 1536 so the N and K tails are exercised.
INTERPRET_CONFIG = gemm_config(16, 256, 128, 4, 1)

_int4_gemm_tuned = triton.autotune(CONFIGS, key=["M_BUCKET", "N", "KH", "OUT_INT32"], cache_results=True)(
    _int4_gemm_kernel
)


def int4_gemm(a_packed: torch.Tensor, a_scale: torch.Tensor, w_packed: torch.Tensor, w_scale: torch.Tensor,
              bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.float16, a_bits: int = 4,
              w_bits: int = 4, out: torch.Tensor | None = None, out_int32: bool = False,
              config: triton.Config | None = None) -> torch.Tensor:
    """``[M, K/2] x [N, K/2] -> [M, N]``: packed-int4 activations (float32 per-token scales
    ``a_scale`` [M]) times packed-int4 weights (per-channel scales ``w_scale`` [N]).

    ``out_int32``: return the raw int32 accumulators (no epilogue). ``config``: run this
    block configuration instead of the autotuned choice (tests check every config).
    """
    check_bits(a_bits, "activation bits")
    check_bits(w_bits, "weight bits")
    if a_packed.dim() != 2 or w_packed.dim() != 2:
        raise ValueError("a_packed and w_packed must be 2-D [rows, K/2] uint8 tensors")
    m, kh = a_packed.shape
    n = w_packed.shape[0]
    check_packed(a_packed, "a_packed", m, kh)
    check_packed(w_packed, "w_packed", n, kh)
    if a_scale.numel() != m or w_scale.numel() != n:
        raise ValueError(f"need one activation scale per token ({m}) and one weight scale per channel ({n}), "
                         f"got {a_scale.numel()} and {w_scale.numel()}")
    if out_dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"out_dtype must be float16, bfloat16 or float32, got {out_dtype}")
    a_scale = a_scale.reshape(-1).float().contiguous()
    w_scale = w_scale.reshape(-1).float().contiguous()
    if bias is not None:
        if bias.numel() != n:
            raise ValueError(f"bias must have {n} entries, got {bias.numel()}")
        bias = bias.reshape(-1).float().contiguous()
    check_device(_int4_gemm_kernel, a_packed, w_packed, a_scale, w_scale, *([bias] if bias is not None else []))
    out = check_out(out, (m, n), torch.int32 if out_int32 else out_dtype, a_packed.device, "out")
    if m == 0 or n == 0:
        return out
    args = (a_packed, w_packed, a_scale, w_scale, bias if bias is not None else a_scale, out, m, n, kh,
            a_packed.stride(0), w_packed.stride(0), out.stride(0), m_bucket(m))
    # interpreter: round float32 -> bf16 to nearest ourselves (launch.round_to)
    upcast = out_dtype == torch.bfloat16 and interpreted(_int4_gemm_kernel)
    flags = dict(A_OFF=offset(a_bits), W_OFF=offset(w_bits), HAS_BIAS=bias is not None, OUT_INT32=out_int32,
                 UPCAST=upcast)
    launch_gemm(_int4_gemm_kernel, _int4_gemm_tuned, INTERPRET_CONFIG, config, m, n, args, flags)
    return out
