"""Weight-only 2..4-bit matmul on CPU through PyTorch's int4-pack kernel (the one torchao's CPU
int4 layout and gpt-fast use): ``aten._convert_weight_to_int4pack_for_cpu`` packs once,
``aten._weight_int4pack_mm_for_cpu`` multiplies.

The kernel dequantizes ``w = (c - 8) * s + z`` per group along K, with ``scales_and_zeros``
[K/g, N, 2] = (s, z) in the input's dtype (checked numerically in tests/kernels/test_cpu_int4.py).
QuantLinear's codes ``c`` (unsigned, 0..2^b-1) mean ``w = (c - zp) * s`` with ``zp = 2^(b-1)``
when symmetric and the stored zero point otherwise, so the codes go in unchanged and
``z = (8 - zp) * s``. In float32 both products are exact (an fp16 scale times an integer below
16), so the kernel sees the reference weight exactly.

Constraints of the kernel (torch 2.13): group size 32, 64, 128 or 256 dividing K, N a multiple
of 16. Per channel becomes the largest such group dividing K with the scale repeated. The
packed layout depends on the CPU's vector width (AVX2 / AVX-512), so it is built in memory
only and never saved.
"""

from __future__ import annotations

import torch

GROUPS = (256, 128, 64, 32)  # what _weight_int4pack_mm_for_cpu accepts
N_MULTIPLE = 16


def available() -> bool:
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and hasattr(
        torch.ops.aten, "_convert_weight_to_int4pack_for_cpu")


def kernel_group(in_features: int, out_features: int, group_size: int | None) -> tuple[int | None, str]:
    """The kernel's group size for a layer (``None`` and the reason when it cannot run)."""
    if not available():
        return None, "this torch build has no _weight_int4pack_mm_for_cpu"
    if out_features % N_MULTIPLE:
        return None, f"out_features={out_features} is not a multiple of {N_MULTIPLE} (int4-pack kernel)"
    if group_size is None:
        for g in GROUPS:
            if in_features % g == 0:
                return g, "per channel"
        return None, f"in_features={in_features} has no divisor in {GROUPS} (int4-pack kernel groups)"
    if group_size not in GROUPS:
        return None, f"group_size={group_size} is not one of {GROUPS} (int4-pack kernel groups)"
    return group_size, "per group"


def pack(codes: torch.Tensor) -> torch.Tensor:
    """Unsigned codes [N, K] (0..15) -> the kernel's packed uint8 layout."""
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), 1)


def scales_and_zeros(scales: torch.Tensor, zero_points: torch.Tensor, in_features: int, group: int,
                     dtype: torch.dtype) -> torch.Tensor:
    """[K/g, N, 2] from QuantLinear's scales [N, G] and integer zero points [N, G] (per channel:
    G = 1, repeated over the kernel's groups)."""
    s = scales.float()
    zp = zero_points.float()
    reps = (in_features // group) // s.shape[1]
    if reps > 1:
        s, zp = s.repeat_interleave(reps, dim=1), zp.repeat_interleave(reps, dim=1)
    z = (8.0 - zp) * s
    return torch.stack([s.T, z.T], dim=-1).to(dtype).contiguous()


def matmul(x: torch.Tensor, packed: torch.Tensor, group: int, sz: torch.Tensor) -> torch.Tensor:
    """``x [M, K] @ deq(W)ᵀ`` -> [M, N] in x's dtype."""
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x.contiguous(), packed, group, sz)


def dequantize_reference(codes: torch.Tensor, sz: torch.Tensor, group: int) -> torch.Tensor:
    """The weight [N, K] the kernel multiplies by, as its documented formula gives it."""
    s = sz[..., 0].float().T.repeat_interleave(group, dim=1)
    z = sz[..., 1].float().T.repeat_interleave(group, dim=1)
    return (codes.float() - 8.0) * s + z
