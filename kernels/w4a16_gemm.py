"""Weight-only W4A16 GEMM: float activations times packed low-bit weights dequantized inside the
kernel, for decode-sized inputs where reading the weight dominates.

    C = x @ deq(W)ᵀ + bias,   deq(W)[n, k] = (code[n, k] - z) * s      (z = 2^(b-1) if symmetric)

Weights are read in QuantLinear's stored layout ([N, K/2] uint8, even k in the low nibble, float16
scales [N, groups], uint8 zero points when asymmetric), with no repacked copy. As in the int4
kernel, the low nibbles multiply the even columns of x and the high nibbles the odd ones.

Per-channel scales are applied once in the epilogue (exact integer-valued weights in the dot);
per-group scales are applied to the weight tile, in float32, then rounded to x's dtype, as
QuantLinear's dequantized weight is.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
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
def dequantize_reference(w_packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                         group_size: int | None, bits: int = 4) -> torch.Tensor:
    """float32 [N, K] from [N, K/2] packed codes (QuantLinear's dequantization, reimplemented)."""
    n, kh = w_packed.shape
    codes = torch.stack([w_packed & 0x0F, w_packed >> 4], dim=-1).reshape(n, 2 * kh).float()
    g = 2 * kh if group_size is None else group_size
    q = codes.reshape(n, -1, g)
    if zeros is None:
        q = q - offset(bits)
        zero = torch.zeros(1)
    else:
        zero = zeros.float()[..., None]
    return ((q - zero) * scales.float()[..., None]).reshape(n, 2 * kh)


def w4a16_gemm_reference(x: torch.Tensor, w_packed: torch.Tensor, scales: torch.Tensor,
                         zeros: torch.Tensor | None = None, group_size: int | None = None,
                         bias: torch.Tensor | None = None, bits: int = 4) -> torch.Tensor:
    w = dequantize_reference(w_packed, scales, zeros, group_size, bits).to(x.dtype)
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))


# --- Triton kernel -------------------------------------------------------------------------------
@triton.jit
def _w4a16_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, bias_ptr, c_ptr, M, N, KH, stride_xm, stride_wn, stride_sn, stride_zn, stride_cm,
    M_BUCKET,
    W_OFF: tl.constexpr, GROUP_KH: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KH: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = tile_ids(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)

    dt: tl.constexpr = x_ptr.dtype.element_ty  # weights are rounded to x's dtype (launch.round_to)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_KH)
    m_ok = rm[:, None] < M
    n_ok = rn[:, None] < N
    x_ptrs = x_ptr + rm[:, None].to(tl.int64) * stride_xm + 2 * rk[None, :]  # even columns; odd = +1
    w_ptrs = w_ptr + rn[:, None].to(tl.int64) * stride_wn + rk[None, :]
    if GROUP_KH == 0:
        if HAS_ZERO:
            zc = tl.load(z_ptr + rn * stride_zn, mask=rn < N, other=0).to(tl.float32)[:, None]
        else:
            zc = W_OFF
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, dtype=tl.float32)
    for k0 in range(0, KH, BLOCK_KH):
        kk = k0 + rk[None, :]
        k_ok = kk < KH
        xe = round_to(tl.load(x_ptrs, mask=m_ok & k_ok, other=0.0), dt, UPCAST)
        xo = round_to(tl.load(x_ptrs + 1, mask=m_ok & k_ok, other=0.0), dt, UPCAST)
        w = tl.load(w_ptrs, mask=n_ok & k_ok, other=0)
        lo = (w & 0x0F).to(tl.float32)
        hi = (w >> 4).to(tl.float32)
        if GROUP_KH > 0:
            g = kk // GROUP_KH  # the byte's two values share a group (even group size)
            s = tl.load(s_ptr + rn[:, None] * stride_sn + g, mask=n_ok & k_ok, other=0.0).to(tl.float32)
            if HAS_ZERO:
                z = tl.load(z_ptr + rn[:, None] * stride_zn + g, mask=n_ok & k_ok, other=0).to(tl.float32)
            else:
                z = W_OFF
            we = round_to((lo - z) * s, dt, UPCAST)
            wo = round_to((hi - z) * s, dt, UPCAST)
        else:
            we = round_to(lo - zc, dt, UPCAST)
            wo = round_to(hi - zc, dt, UPCAST)
        acc = tl.dot(xe, tl.trans(we), acc, input_precision=PRECISION)
        acc = tl.dot(xo, tl.trans(wo), acc, input_precision=PRECISION)
        x_ptrs += 2 * BLOCK_KH
        w_ptrs += BLOCK_KH

    if GROUP_KH == 0:
        acc = acc * tl.load(s_ptr + rn * stride_sn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        acc = acc + tl.load(bias_ptr + rn, mask=rn < N, other=0.0)[None, :]
    c_ptrs = c_ptr + rm[:, None].to(tl.int64) * stride_cm + rn[None, :]
    tl.store(c_ptrs, round_to(acc, dt, UPCAST).to(dt), mask=m_ok & (rn[None, :] < N))


# Decode tiles first (M <= 16: one M tile, narrow N so enough programs fill the GPU), then
# prefill tiles for the same kernel at larger M.
CONFIGS = [
    gemm_config(16, 32, 128, 4, 4),
    gemm_config(16, 64, 128, 4, 4),
    gemm_config(16, 128, 64, 4, 4),
    gemm_config(32, 64, 128, 4, 4),
    gemm_config(64, 128, 64, 4, 3),
    gemm_config(128, 128, 32, 8, 3),
]
INTERPRET_CONFIG = gemm_config(16, 256, 128, 4, 1)

_w4a16_tuned = triton.autotune(CONFIGS, key=["M_BUCKET", "N", "KH", "GROUP_KH"], cache_results=True)(_w4a16_kernel)


def w4a16_gemm(x: torch.Tensor, w_packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None = None,
               group_size: int | None = None, bias: torch.Tensor | None = None, bits: int = 4,
               out: torch.Tensor | None = None, config: triton.Config | None = None) -> torch.Tensor:
    """``x`` [M, K] (float32/float16/bfloat16) times packed weights [N, K/2] -> [M, N] in x's dtype.

    ``scales`` [N, groups] (float16 as QuantLinear stores them, or float32); ``zeros`` [N, groups]
    uint8 for asymmetric weights, ``None`` for symmetric; ``group_size`` ``None`` = per channel.
    """
    check_bits(bits, "weight bits")
    if x.dim() != 2 or x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"x must be a 2-D float32/float16/bfloat16 tensor [tokens, K], got {x.dtype} {tuple(x.shape)}")
    m, k = x.shape
    if k % 2:
        raise ValueError(f"K={k} is odd: packed rows need an even input size; use the torch path")
    n = w_packed.shape[0] if w_packed.dim() == 2 else -1
    check_packed(w_packed, "w_packed", n, k // 2)
    groups = 1 if group_size is None else k // group_size
    if group_size is not None and (group_size % 2 or k % group_size):
        raise ValueError(f"group_size={group_size} must be even and divide K={k}")
    scales = scales.reshape(n, -1)
    if scales.shape[1] != groups:
        raise ValueError(f"scales must be [N, {groups}] for group_size={group_size}, got {tuple(scales.shape)}")
    if zeros is not None:
        zeros = zeros.reshape(n, -1)
        if zeros.shape != scales.shape or zeros.dtype != torch.uint8:
            raise ValueError(f"zeros must be uint8 {tuple(scales.shape)}, got {zeros.dtype} {tuple(zeros.shape)}")
    if bias is not None:
        if bias.numel() != n:
            raise ValueError(f"bias must have {n} entries, got {bias.numel()}")
        bias = bias.reshape(-1).float().contiguous()
    if x.stride(-1) != 1:
        x = x.contiguous()
    scales = scales.contiguous()
    zeros = zeros.contiguous() if zeros is not None else None
    check_device(_w4a16_kernel, x, w_packed, scales, *[t for t in (zeros, bias) if t is not None])
    out = check_out(out, (m, n), x.dtype, x.device, "out")
    if m == 0 or n == 0:
        return out
    z = zeros if zeros is not None else scales
    args = (x, w_packed, scales, z, bias if bias is not None else scales, out, m, n, k // 2, x.stride(0),
            w_packed.stride(0), scales.stride(0), z.stride(0), out.stride(0), m_bucket(m))
    upcast = x.dtype == torch.bfloat16 and interpreted(_w4a16_kernel)
    flags = dict(W_OFF=offset(bits), GROUP_KH=0 if group_size is None else group_size // 2,
                 HAS_ZERO=zeros is not None, HAS_BIAS=bias is not None,
                 PRECISION="ieee" if x.dtype == torch.float32 or upcast else "tf32", UPCAST=upcast)
    launch_gemm(_w4a16_kernel, _w4a16_tuned, INTERPRET_CONFIG, config, m, n, args, flags)
    return out
