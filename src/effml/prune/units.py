"""The prunable matrices of a model: one per role of every decoder linear (a fused linear gives
one unit per role, as a row slice), in block and role order, matching :func:`esd` records.

A linear already quantized by ``effml.quantize`` (an ``effml.quant.QuantLinear`` with integer
codes, or the shared ``base`` of a recursive model's per-depth linear) is pruned on its grid:
a removed weight gets the code of the zero point (dequantizes to exactly 0), kept weights keep
their codes (or, for SparseGPT's update, are rounded on the same grid), and the quantizer's
scales and zero points stay as they are. The result is exactly quantized and exactly sparse.
Models with online input transforms (QuaRot, FlatQuant) are refused: their stored weights act in
the transformed basis, so input statistics and masks would not match them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..core.surgery import LinearRef, iter_linears


def _quantized(module: nn.Module):
    """The integer-coded QuantLinear behind ``module`` (itself or a shared ``base``), else None."""
    from ..quant.qlinear import QuantLinear

    base = getattr(module, "base", None)
    m = module if base is None else base
    return m if isinstance(m, QuantLinear) and m.weight is None else None


def _float_module(module: nn.Module) -> nn.Module:
    """The module holding the float ``weight`` (a recursive depth's float base, or itself)."""
    base = getattr(module, "base", None)
    return base if base is not None else module


def _codes(q) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes as float32 [out, in], scale [out, groups], zero [out, groups]) of a QuantLinear."""
    from ..quant.quantizers import qrange, unpack_codes

    codes = unpack_codes(q.qweight, q.w_bits, (q.out_features, q.in_features)).float()
    scale = q.scales.float()
    if q.w_sym:
        codes = codes + qrange(q.w_bits, True)[0]  # signed codes, zero point 0
        zero = torch.zeros_like(scale)
    else:
        zero = q.zeros.float()
    return codes, scale, zero


def _expand(t: torch.Tensor, group_size: int | None, in_features: int) -> torch.Tensor:
    g = in_features if group_size is None else group_size
    return t.repeat_interleave(g, dim=1)


@dataclass
class Unit:
    block: int
    role: str
    name: str
    ref: LinearRef
    rows: slice

    @property
    def weight(self) -> torch.Tensor:
        """The role's rows of the weight: a view of the float weight, or (quantized) the
        dequantized codes in float32, exact on the grid."""
        q = _quantized(self.ref.module)
        if q is None:
            return _float_module(self.ref.module).weight.data[self.rows]
        codes, scale, zero = _codes(q)
        deq = (codes - _expand(zero, q.group_size, q.in_features)) * _expand(scale, q.group_size, q.in_features)
        return deq[self.rows]

    def set_weight(self, w: torch.Tensor) -> None:
        q = _quantized(self.ref.module)
        if q is None:
            m = _float_module(self.ref.module)
            m.weight.data[self.rows] = w.to(m.weight.dtype)
            return
        full = _whole(self).weight
        full[self.rows] = w.to(torch.float32)
        codes, scale, zero = _codes(q)
        from ..quant.quantizers import dequantize_weight, quantize_weight

        new = quantize_weight(full, scale, zero, q.w_bits, q.w_sym, q.group_size)
        back = dequantize_weight(new, scale, zero, q.w_bits, q.w_sym, q.group_size)
        if not torch.equal(back, full):
            raise RuntimeError(f"{self.name}: pruned weights left the quantization grid (internal error)")
        q.set_quantized_weight(full, q.w_bits, q.w_sym, q.group_size, scale=scale, zero=zero)

    def grid(self) -> Callable[[int, torch.Tensor], torch.Tensor] | None:
        """For a quantized unit: ``fn(j, column)`` rounding column ``j`` of its rows to the stored
        grid (scales and zero points kept); None for a float unit."""
        q = _quantized(self.ref.module)
        if q is None:
            return None
        from ..quant.quantizers import qrange

        _, scale, zero = _codes(q)
        scale, zero = scale[self.rows].double(), zero[self.rows].double()
        lo, hi = qrange(q.w_bits, q.w_sym)
        g = q.in_features if q.group_size is None else q.group_size

        def fn(j: int, col: torch.Tensor) -> torch.Tensor:
            s, z = scale[:, j // g].to(col.device), zero[:, j // g].to(col.device)
            return (torch.clamp(torch.round(col / s) + z, lo, hi) - z) * s

        return fn

    @property
    def shape(self) -> tuple[int, int]:
        m = self.ref.module
        return (len(range(m.out_features)[self.rows]), m.in_features)

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    def zeros(self) -> int:
        return int((self.weight == 0).sum().item())


def _whole(u: Unit) -> Unit:
    return Unit(u.block, u.role, u.name, u.ref, slice(None))


def check_prunable(model: nn.Module) -> None:
    """Raise if the model's stored weights cannot be pruned as they are (online transforms)."""
    for ref in iter_linears(model):
        m = _float_module(ref.module)
        if getattr(m, "input_transform", None) is not None:
            raise ValueError(
                f"{ref.name} carries an online input transform (QuaRot / FlatQuant): its stored weights act "
                "in the transformed basis and are dense by construction, so they cannot be pruned. Prune the "
                "model first, then quantize it"
            )


# measured sparsity may exceed a target by rounding (per-matrix counts, alpha allocation)
SPARSITY_TOLERANCE = 1e-3


def existing_sparsity(units: list[Unit]) -> float:
    """Fraction of exact zeros over the prunable matrices."""
    return sum(u.zeros() for u in units) / max(sum(u.numel for u in units), 1)


def check_not_lower(units: list[Unit], target: float) -> float:
    """Raise if ``target`` is below the sparsity the model already has (pruning cannot add weights
    back); returns the measured sparsity. Equal or higher targets are fine."""
    have = existing_sparsity(units)
    if target < have - SPARSITY_TOLERANCE:
        raise ValueError(
            f"the model is already {have:.4f} sparse (exact zeros in its decoder linears); pruning to {target:.4f} "
            "cannot restore weights. Ask for a sparsity >= the current one, or prune the original model"
        )
    return have


def prunable_units(model: nn.Module) -> list[Unit]:
    units = []
    for ref in iter_linears(model):
        for role, rows in ref.roles.items():
            name = f"{ref.name}[{role}]" if ref.fused else ref.name
            units.append(Unit(ref.block, role, name, ref, rows))
    return units
