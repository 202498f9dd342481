"""Fused online transform + per-token symmetric activation quantization + int4 packing.

Per token x (length K = n1 * n2), with optional per-channel multiplier s and Kronecker factors
L [n1, n1], R [n2, n2] (FlatQuant's P1 ⊗ P2, or QuaRot's rotation):

    Y = Lᵀ ((x * s).reshape(n1, n2) @ R)          # = vec(x (L ⊗ R)), KroneckerTransform
    scale = max(max|Y| * clip / qmax, 1e-8)        # ActQuantizer (sym), clip = learned ratio
    q = clamp(round_half_even(Y / scale), -2^(b-1), 2^(b-1) - 1)

Output: codes stored unsigned (q + 2^(b-1)) two per byte, even column in the low nibble
(``quantizers.pack_codes`` applied per token), as uint8 [M, K/2], plus float32 scales [M].

The kernel computes the even and odd columns of Y separately (Y R_even, Y R_odd with
R's even / odd columns), so the two nibbles of each byte come out of two small dots without
an in-register interleave. Factor sizes need not be powers of two (24 x 24 for 576, 32 x 48
for 1536): tiles are padded with zeros, which changes no product and no max.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import absmax, check_bits, check_device, check_out, interpreted, offset, pow2_at_least, round_to

EPS = 1e-8  # quantizers._EPS: the smallest scale


# --- torch reference ------------------------------------------------------------------------------
def transform_reference(x: torch.Tensor, left: torch.Tensor | None, right: torch.Tensor | None,
                        smul: torch.Tensor | None = None) -> torch.Tensor:
    """``(x * smul)(left ⊗ right)`` per row, in x's dtype, in the kernel's order: R first, then Lᵀ."""
    m, k = x.shape
    n1, n2 = factor_sizes(k, left, right)
    y = x if smul is None else x * smul.to(x.dtype)
    y = y.reshape(m, n1, n2)
    if right is not None:
        y = y @ right.to(x.dtype)
    if left is not None:
        y = left.to(x.dtype).transpose(0, 1) @ y
    return y.reshape(m, k)


def quantize_reference(y: torch.Tensor, clip: float, bits: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row symmetric quantization of an already transformed ``y`` [M, K] (float32 math):
    (packed uint8 [M, K/2], float32 scales [M])."""
    check_bits(bits, "activation bits")
    off = offset(bits)
    y = y.float()
    scale = (y.abs().amax(-1) * clip / (off - 1)).clamp_min(EPS)
    q = torch.clamp(torch.round(y / scale[:, None]), -off, off - 1) + off
    codes = q.to(torch.uint8)
    return codes[:, 0::2] | (codes[:, 1::2] << 4), scale


def transform_quant_reference(x: torch.Tensor, left: torch.Tensor | None, right: torch.Tensor | None,
                              clip: float = 1.0, bits: int = 4, smul: torch.Tensor | None = None,
                              ) -> tuple[torch.Tensor, torch.Tensor]:
    """What :func:`transform_quant` computes, in plain torch."""
    return quantize_reference(transform_reference(x, left, right, smul), clip, bits)


def factor_sizes(k: int, left: torch.Tensor | None, right: torch.Tensor | None) -> tuple[int, int]:
    if left is None and right is None:
        return 1, k
    n1 = left.shape[0] if left is not None else k // right.shape[0]
    n2 = right.shape[0] if right is not None else k // n1
    if n1 * n2 != k:
        raise ValueError(f"transform of size {n1}x{n2} does not match the activation size {k}")
    for name, f, n in (("left", left, n1), ("right", right, n2)):
        if f is not None and tuple(f.shape) != (n, n):
            raise ValueError(f"{name} factor must be square [{n}, {n}], got {tuple(f.shape)}")
    return n1, n2


# --- Triton kernel -------------------------------------------------------------------------------
@triton.jit
def _round_half_even(v):
    # torch.round rounds half to even; floor(v + 0.5) is exact for |v| < 2^22 (our |v| <= qmax / clip)
    r = tl.floor(v + 0.5)
    tie = (r - v) == 0.5
    odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
    return tl.where(tie & odd, r - 1.0, r)


@triton.jit
def _transform_quant_kernel(
    x_ptr, left_ptr, right_ptr, smul_ptr, out_ptr, scale_ptr, clip, M, stride_xm, stride_om,
    N1: tl.constexpr, N2: tl.constexpr, N1P: tl.constexpr, N2P: tl.constexpr, H2P: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_SMUL: tl.constexpr,
    OFFSET: tl.constexpr, TOKENS: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    H2: tl.constexpr = N2 // 2
    dt: tl.constexpr = x_ptr.dtype.element_ty
    # Every value is rounded to x's dtype where torch's path rounds (x * s, each matmul), via
    # round_to: a cast on GPU, float32-held bf16 in the interpreter (see launch.round_to).
    pid = tl.program_id(0)
    i = tl.arange(0, N1P)[:, None]  # row of the token's n1 x n2 matrix
    p = tl.arange(0, H2P)[None, :]  # column pair (2p, 2p + 1)
    pair_mask = (i < N1) & (p < H2)
    # factors are loaded once per program and reused for TOKENS tokens
    if HAS_RIGHT:
        j = tl.arange(0, N2P)[None, :]
        jr = tl.arange(0, N2P)[:, None]
        x_mask = (i < N1) & (j < N2)
        r_mask = (jr < N2) & (p < H2)
        r_even = round_to(tl.load(right_ptr + jr * N2 + 2 * p, mask=r_mask, other=0.0), dt, UPCAST)
        r_odd = round_to(tl.load(right_ptr + jr * N2 + 2 * p + 1, mask=r_mask, other=0.0), dt, UPCAST)
        if HAS_SMUL:
            s_full = round_to(tl.load(smul_ptr + i * N2 + j, mask=x_mask, other=0.0), dt, UPCAST)
    else:
        if HAS_SMUL:
            s_even = round_to(tl.load(smul_ptr + i * N2 + 2 * p, mask=pair_mask, other=0.0), dt, UPCAST)
            s_odd = round_to(tl.load(smul_ptr + i * N2 + 2 * p + 1, mask=pair_mask, other=0.0), dt, UPCAST)
    if HAS_LEFT:
        a = tl.arange(0, N1P)[:, None]
        c = tl.arange(0, N1P)[None, :]
        # Lᵀ[a, c] = L[c, a]
        lt = round_to(tl.load(left_ptr + c * N1 + a, mask=(a < N1) & (c < N1), other=0.0), dt, UPCAST)

    for t in range(TOKENS):
        m = pid * TOKENS + t
        ok = (i * 0 + m) < M  # as a block: the interpreter rejects scalar & block masks
        row = x_ptr + m.to(tl.int64) * stride_xm
        if HAS_RIGHT:
            xt = round_to(tl.load(row + i * N2 + j, mask=x_mask & ok, other=0.0), dt, UPCAST)
            if HAS_SMUL:
                xt = round_to(xt * s_full, dt, UPCAST)
            te = round_to(tl.dot(xt, r_even, input_precision=PRECISION), dt, UPCAST)
            to = round_to(tl.dot(xt, r_odd, input_precision=PRECISION), dt, UPCAST)
        else:
            te = round_to(tl.load(row + i * N2 + 2 * p, mask=pair_mask & ok, other=0.0), dt, UPCAST)
            to = round_to(tl.load(row + i * N2 + 2 * p + 1, mask=pair_mask & ok, other=0.0), dt, UPCAST)
            if HAS_SMUL:
                te = round_to(te * s_even, dt, UPCAST)
                to = round_to(to * s_odd, dt, UPCAST)
        if HAS_LEFT:
            te = round_to(tl.dot(lt, te, input_precision=PRECISION), dt, UPCAST)
            to = round_to(tl.dot(lt, to, input_precision=PRECISION), dt, UPCAST)
        ye = te.to(tl.float32)
        yo = to.to(tl.float32)
        amax = tl.maximum(absmax(ye), absmax(yo))
        scale = tl.maximum(tl.math.div_rn(amax * clip, OFFSET - 1.0), 1e-8)
        qe = tl.minimum(tl.maximum(_round_half_even(tl.math.div_rn(ye, scale)), -OFFSET), OFFSET - 1)
        qo = tl.minimum(tl.maximum(_round_half_even(tl.math.div_rn(yo, scale)), -OFFSET), OFFSET - 1)
        byte = (qe + OFFSET).to(tl.uint8) | ((qo + OFFSET).to(tl.uint8) << 4)
        tl.store(out_ptr + m.to(tl.int64) * stride_om + i * H2 + p, byte, mask=pair_mask & ok)
        tl.store(scale_ptr + m, scale, mask=m < M)


def _precision(dtype: torch.dtype, upcast: bool) -> str:
    # fp32 activations: exact fp32 products (tf32 would move codes); fp16/bf16: native tensor cores
    return "ieee" if dtype == torch.float32 or upcast else "tf32"


def transform_quant(x: torch.Tensor, left: torch.Tensor | None = None, right: torch.Tensor | None = None,
                    clip: float = 1.0, bits: int = 4, smul: torch.Tensor | None = None,
                    out: torch.Tensor | None = None, scales_out: torch.Tensor | None = None,
                    tokens_per_program: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused transform + quantize + pack of ``x`` [M, K] (float32 / float16 / bfloat16).

    ``left`` / ``right``: Kronecker factors (``None`` = identity), ``smul``: per-channel
    multiplier applied first, ``clip``: fraction of each token's absmax kept. Returns packed
    codes uint8 [M, K/2] and float32 scales [M] (written into ``out`` / ``scales_out`` if given).
    """
    check_bits(bits, "activation bits")
    if x.dim() != 2 or x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"x must be a 2-D float32/float16/bfloat16 tensor [tokens, K], got {x.dtype} {tuple(x.shape)}")
    if not 0.0 < float(clip) <= 1.0:
        raise ValueError(f"clip must be in (0, 1], got {clip}")
    m, k = x.shape
    n1, n2 = factor_sizes(k, left, right)
    if n2 % 2:
        raise ValueError(f"the transform's second factor has odd size {n2}: packing needs an even row length; "
                         "use the torch path for this layer")
    if smul is not None and smul.numel() != k:
        raise ValueError(f"smul must have {k} entries, got {smul.numel()}")
    if x.stride(-1) != 1:
        x = x.contiguous()
    left, right, smul = (None if t is None else t.contiguous() for t in (left, right, smul))
    check_device(_transform_quant_kernel, x, *[t for t in (left, right, smul) if t is not None])
    out = check_out(out, (m, k // 2), torch.uint8, x.device, "out")
    scales_out = check_out(scales_out, (m,), torch.float32, x.device, "scales_out")
    if m == 0:
        return out, scales_out
    uses_dot = left is not None or right is not None
    floor = 16 if uses_dot else 1  # dot operands need >= 16 along every dim we tile
    n1p, n2p, h2p = pow2_at_least(n1, floor), pow2_at_least(n2, floor), pow2_at_least(n2 // 2, floor)
    if tokens_per_program is None:
        # amortise the factor loads; the interpreter is fastest with few programs
        tokens_per_program = 8 if interpreted(_transform_quant_kernel) else (1 if m < 1024 else 4)
    dummy = x  # never read when the matching HAS_* flag is off
    lt = left if left is not None else dummy
    rt = right if right is not None else dummy
    st = smul.reshape(-1) if smul is not None else dummy
    upcast = x.dtype == torch.bfloat16 and interpreted(_transform_quant_kernel)
    grid = (triton.cdiv(m, tokens_per_program),)
    num_warps = 4 if n1p * n2p <= 64 * 64 else 8
    _transform_quant_kernel[grid](
        x, lt, rt, st, out, scales_out, float(clip), m, x.stride(0), out.stride(0),
        N1=n1, N2=n2, N1P=n1p, N2P=n2p, H2P=h2p,
        HAS_LEFT=left is not None, HAS_RIGHT=right is not None, HAS_SMUL=smul is not None,
        OFFSET=offset(bits), TOKENS=tokens_per_program, PRECISION=_precision(x.dtype, upcast), UPCAST=upcast,
        num_warps=num_warps,
    )
    return out, scales_out
