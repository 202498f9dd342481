"""What every kernel shares: the interpreter check, block-size helpers, argument checks, and the
small jit helpers the kernels call.

Triton decides at decoration time (``@triton.jit``) whether a kernel is compiled or run by the
interpreter, from ``TRITON_INTERPRET``. The kernel modules therefore read it once, when first
imported; :func:`interpreted` tells which case a kernel object is in.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

# Hopper and Ampere MMA need every dot dimension >= 16; int8 MMA wants K >= 32.
MIN_DOT = 16


def interpreted(kernel) -> bool:
    """Whether ``kernel`` (a jit or autotuned function) runs in the Triton interpreter."""
    while hasattr(kernel, "fn") and not isinstance(kernel, (JITFunction, InterpretedFunction)):
        kernel = kernel.fn  # unwrap autotuners / heuristics
    return isinstance(kernel, InterpretedFunction)


def gemm_config(bm: int, bn: int, bkh: int, warps: int, stages: int, group: int = 8) -> triton.Config:
    """An autotune config of the packed GEMMs (BLOCK_KH counts packed bytes: 2 * BLOCK_KH of K)."""
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_KH": bkh, "GROUP_M": group},
                         num_warps=warps, num_stages=stages)


def launch_gemm(kernel, tuned, interpret_config: triton.Config, config: triton.Config | None, m: int, n: int,
                args: tuple, flags: dict) -> None:
    """Launch an M x N tiled GEMM: autotuned (``tuned``) on a GPU, or with one fixed ``config``
    (the interpreter's, or the caller's, e.g. to test every autotune config)."""
    if config is None and interpreted(kernel):
        config = interpret_config
    if config is None:
        def grid(meta):
            return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

        tuned[grid](*args, **flags)
    else:
        kw = config.all_kwargs()
        kernel[(triton.cdiv(m, kw["BLOCK_M"]) * triton.cdiv(n, kw["BLOCK_N"]),)](*args, **flags, **kw)


def pow2_at_least(n: int, floor: int = MIN_DOT) -> int:
    return max(floor, triton.next_power_of_2(int(n)))


def m_bucket(m: int) -> int:
    """Autotuning key for the token count: decode, small and large prefill tune separately
    without retuning for every distinct M."""
    return min(triton.next_power_of_2(max(int(m), 1)), 4096)


def check_device(kernel, *tensors: torch.Tensor) -> None:
    """Compiled kernels need CUDA tensors; the interpreter takes CPU tensors."""
    devices = {t.device.type for t in tensors}
    if len({t.device for t in tensors}) > 1:
        raise ValueError(f"kernel inputs are on different devices {sorted(str(t.device) for t in tensors)}: "
                         "move them to one device")
    if interpreted(kernel):
        return
    if devices != {"cuda"}:
        raise RuntimeError(
            f"Triton kernels need CUDA tensors, got {sorted(devices)}: move the model to a GPU, or set "
            "TRITON_INTERPRET=1 before the kernels are first used (imported) to run them, slowly, on CPU"
        )


def check_packed(t: torch.Tensor, name: str, rows: int, cols: int) -> None:
    if t.dtype != torch.uint8 or t.dim() != 2 or tuple(t.shape) != (rows, cols):
        raise ValueError(f"{name} must be a uint8 tensor [{rows}, {cols}] of packed codes (two per byte), "
                         f"got {t.dtype} {tuple(t.shape)}")
    if t.stride(1) != 1:
        raise ValueError(f"{name} must have contiguous rows: call .contiguous() first")


def check_bits(bits: int, what: str) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 4:
        raise ValueError(f"{what} must be 2, 3 or 4 (codes packed two per byte), got {bits!r}")
    return bits


def check_out(out: torch.Tensor | None, shape: tuple[int, ...], dtype: torch.dtype, device, name: str) -> torch.Tensor:
    """A caller-provided output must match exactly; otherwise allocate (uninitialised: the
    kernels write every element, which the tests check by poisoning ``out``)."""
    if out is None:
        return torch.empty(shape, dtype=dtype, device=device)
    if tuple(out.shape) != tuple(shape) or out.dtype != dtype or out.device != torch.device(device):
        raise ValueError(f"{name} must be {dtype} {tuple(shape)} on {device}, got {out.dtype} "
                         f"{tuple(out.shape)} on {out.device}")
    if not out.is_contiguous():
        raise ValueError(f"{name} must be contiguous")
    return out


def offset(bits: int) -> int:
    """Stored codes are unsigned: a symmetric b-bit code q is stored as q + 2^(b-1)
    (the layout of ``effml.quant.quantizers.pack_codes``)."""
    return 2 ** (bits - 1)


@triton.jit
def round_to(v, dt: tl.constexpr, UPCAST: tl.constexpr):
    """``v`` (float32 or dt) rounded to ``dt`` to nearest-even, returned in the arithmetic dtype.

    Native kernels just cast. The interpreter stores bfloat16 as raw uint16 (its products are
    wrong) and truncates float32 -> bfloat16, so under ``UPCAST`` bf16 values are kept in float32
    and rounded here with the usual bit trick (finite inputs)."""
    if UPCAST:
        bits = v.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True)
    else:
        return v.to(dt)


# The kernels call only Triton builtins and the helpers here, never the jit functions of
# triton.language.standard (tl.cdiv, tl.zeros, tl.max): when triton itself was imported before
# TRITON_INTERPRET was set (as in a test session), those stay compiled and an interpreted kernel
# could not call them. The max combine below is the standard one, which both the compiler and
# the interpreter's fast numpy reduction recognise.
_MAX_COMBINE = tl.standard._elementwise_max


@triton.jit
def absmax(x):
    """max |x| over the whole block."""
    return tl.reduce(tl.abs(x), None, _MAX_COMBINE)


@triton.jit
def tile_ids(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(row tile, column tile) of program ``pid`` in grouped order: programs that run together
    share rows of A and columns of W in L2."""
    num_m = (M + BLOCK_M - 1) // BLOCK_M
    num_n = (N + BLOCK_N - 1) // BLOCK_N
    group = GROUP_M * num_n
    first_m = (pid // group) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    return first_m + (pid % group) % size_m, (pid % group) // size_m
