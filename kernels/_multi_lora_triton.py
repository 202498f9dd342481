"""Triton kernels behind :func:`effml.kernels.multi_lora.multi_lora` (imported lazily, so the
module and its torch reference work where Triton is not installed).

Both kernels walk the same tile table: tile ``t`` is up to ``BLOCK_M`` rows (``order[start :
start + length]``) that all use depth ``depth[t]``'s LoRA, so each tile is a plain dense matmul.
Only ``triton.language`` builtins are used (no ``@jit`` helpers of its standard library such as
``tl.zeros``), so the kernels also run when this module is (re)imported under the interpreter
after triton itself was imported compiled (see tests/kernels/conftest.py).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _tile(tile, n, order_ptr, depth_ptr, start_ptr, BLOCK_M: tl.constexpr):
    """The tile's depth, its (up to BLOCK_M) row indices, and which of those are real."""
    offs_m = tl.arange(0, BLOCK_M)
    m_mask = offs_m < n
    rows = tl.load(order_ptr + tl.load(start_ptr + tile) + offs_m, mask=m_mask, other=0).to(tl.int64)
    return tl.load(depth_ptr + tile).to(tl.int64), rows, m_mask


@triton.jit
def shrink_kernel(x_ptr, a_ptr, s_ptr, order_ptr, depth_ptr, start_ptr, len_ptr, IN, R,
                  stride_xm, stride_xk, stride_ad, stride_ar, stride_ak, stride_sm, stride_sr,
                  BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, PREC: tl.constexpr):
    """s[rows, r-block] = x[rows] @ A[d, r-block]^T, accumulated in fp32."""
    tile = tl.program_id(0)
    n = tl.load(len_ptr + tile)
    if n == 0:  # spare tile of the upper-bound grid
        return
    d, rows, m_mask = _tile(tile, n, order_ptr, depth_ptr, start_ptr, BLOCK_M)
    offs_r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_mask = offs_r < R
    acc = tl.full((BLOCK_M, BLOCK_R), 0.0, tl.float32)
    for k0 in range(0, IN, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < IN
        x = tl.load(x_ptr + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        a = tl.load(a_ptr + d * stride_ad + offs_r[:, None] * stride_ar + offs_k[None, :] * stride_ak,
                    mask=r_mask[:, None] & k_mask[None, :], other=0.0)
        acc += tl.dot(x, tl.trans(a), input_precision=PREC)
    tl.store(s_ptr + rows[:, None] * stride_sm + offs_r[None, :] * stride_sr, acc,
             mask=m_mask[:, None] & r_mask[None, :])


@triton.jit
def expand_kernel(s_ptr, b_ptr, out_ptr, order_ptr, depth_ptr, start_ptr, len_ptr, R, OUT, scale,
                  stride_sm, stride_sr, stride_bd, stride_bo, stride_br, stride_om, stride_on,
                  BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr):
    """out[rows, n-block] += scale * s[rows] @ B[d, n-block]^T (``out`` already holds the base)."""
    tile = tl.program_id(0)
    n = tl.load(len_ptr + tile)
    if n == 0:
        return
    d, rows, m_mask = _tile(tile, n, order_ptr, depth_ptr, start_ptr, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < OUT
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for r0 in range(0, R, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        r_mask = offs_r < R
        s = tl.load(s_ptr + rows[:, None] * stride_sm + offs_r[None, :] * stride_sr,
                    mask=m_mask[:, None] & r_mask[None, :], other=0.0)
        b = tl.load(b_ptr + d * stride_bd + offs_n[:, None] * stride_bo + offs_r[None, :] * stride_br,
                    mask=n_mask[:, None] & r_mask[None, :], other=0.0)
        # the rank-r intermediate goes back to the weights' dtype, as Punica's expand does
        acc += tl.dot(s.to(b.dtype), tl.trans(b), input_precision=PREC)
    out_ptrs = out_ptr + rows[:, None] * stride_om + offs_n[None, :] * stride_on
    mask = m_mask[:, None] & n_mask[None, :]
    prev = tl.load(out_ptrs, mask=mask, other=0.0)
    tl.store(out_ptrs, (prev.to(tl.float32) + scale * acc).to(prev.dtype), mask=mask)
