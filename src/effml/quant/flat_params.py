"""Trainable pieces of FlatQuant: orthogonal-SVD factors, Kronecker affine transforms and the
calibration-time linear layer (transform, learnable weight clipping, STE fake quantization)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .act import LEARNABLE_CLIP_INIT, ActQuantizer
from .quantizers import qrange, round_ste, scale_zero
from .transforms import kron_apply


def cayley(skew_param: torch.Tensor) -> torch.Tensor:
    """Orthogonal ``(I - A/2)^{-1} (I + A/2)`` of the skew-symmetric part of the parameter."""
    a = skew_param.triu(1)
    a = a - a.T
    eye = torch.eye(a.shape[0], dtype=a.dtype, device=a.device)
    return torch.linalg.solve(eye - a / 2, eye + a / 2)


class OrthoFactor(nn.Module):
    """``P = U diag(σ) Vᵀ`` with orthogonal U = base·Cayley(A_u), V = Cayley(A_v): invertible by
    construction, with the exact inverse-transpose ``U diag(1/σ) Vᵀ`` (no matrix inverse)."""

    def __init__(self, base: torch.Tensor):
        super().__init__()
        n = base.shape[0]
        self.register_buffer("base", base.float().clone())
        self.skew_u = nn.Parameter(torch.zeros(n, n))
        self.skew_v = nn.Parameter(torch.zeros(n, n))
        self.sigma = nn.Parameter(torch.ones(n))

    def _uv(self):
        return self.base @ cayley(self.skew_u), cayley(self.skew_v)

    def matrix(self) -> torch.Tensor:
        u, v = self._uv()
        return (u * self.sigma) @ v.T

    def inv_t(self) -> torch.Tensor:
        u, v = self._uv()
        return (u / self.sigma) @ v.T


class FlatTransform(nn.Module):
    """``x -> (x ⊙ s)(L ⊗ R)``; a weight consuming it becomes ``(W ⊘ s)(L^{-T} ⊗ R^{-T})``."""

    def __init__(self, left: OrthoFactor | None, right: OrthoFactor | None, scale: torch.Tensor | None = None):
        super().__init__()
        self.left, self.right = left, right
        self.scale = nn.Parameter(scale.float().clone()) if scale is not None else None

    def forward(self, x):
        if self.scale is not None:
            x = x * self.scale
        return kron_apply(x, None if self.left is None else self.left.matrix(),
                          None if self.right is None else self.right.matrix())

    def merge_weight(self, w):
        if self.scale is not None:
            w = w / self.scale
        return kron_apply(w, None if self.left is None else self.left.inv_t(),
                          None if self.right is None else self.right.inv_t())


class FlatLinear(nn.Module):
    """A linear while FlatQuant calibrates it.

    forward: ``Q_a(online(x)) @ Q_w(clip(W'))ᵀ + b'`` where ``W'`` is the original weight with
    ``merge``'s inverse folded in (``merge`` is ``online`` itself, or for o_proj the heads
    transform together with the per-head value transform P_v) and, for the rows in
    ``out_rows``, the value transform P_v applied per head to the outputs (v_proj).
    """

    def __init__(self, weight, bias, online: FlatTransform | None, merge: FlatTransform | None,
                 act_quant: ActQuantizer | None, w_bits: int, w_sym: bool, group_size: int | None, lwc: bool,
                 out_factor: OrthoFactor | None = None, out_rows: slice | None = None, head_dim: int = 0):
        super().__init__()
        self.register_buffer("w0", weight.detach().float().clone())
        self.register_buffer("b0", None if bias is None else bias.detach().float().clone())
        self.online, self.merge, self.act_quant = online, merge, act_quant
        self.out_factor, self.out_rows, self.head_dim = out_factor, out_rows, head_dim
        self.w_bits, self.w_sym, self.group_size = w_bits, w_sym, group_size
        if lwc and w_bits < 16:
            self.clip_max = nn.Parameter(torch.full((weight.shape[0], 1), LEARNABLE_CLIP_INIT))
            self.clip_min = nn.Parameter(torch.full((weight.shape[0], 1), LEARNABLE_CLIP_INIT))
        else:
            self.clip_max = self.clip_min = None

    def _out_transform(self, t: torch.Tensor) -> torch.Tensor:
        if self.out_factor is None:
            return t
        p = self.out_factor.matrix()
        rows = t[self.out_rows]
        d = self.head_dim
        heads = rows.reshape(rows.shape[0] // d, d, *rows.shape[1:])
        new = torch.einsum("de,hd...->he...", p, heads).reshape(rows.shape)
        start = self.out_rows.start or 0
        return torch.cat([t[:start], new, t[start + rows.shape[0]:]], 0)

    def merged_weight(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Transformed and clipped weight (before weight quantization) and bias."""
        w = self.w0 if self.merge is None else self.merge.merge_weight(self.w0)
        w = self._out_transform(w)
        b = None if self.b0 is None else self._out_transform(self.b0)
        if self.clip_max is not None:
            hi = w.amax(1, keepdim=True) * torch.sigmoid(self.clip_max)
            lo = w.amin(1, keepdim=True) * torch.sigmoid(self.clip_min)
            w = torch.minimum(torch.maximum(w, lo), hi)
        return w, b

    def _fake_quant_weight(self, w):
        if self.w_bits >= 16:
            return w
        out_f, in_f = w.shape
        g = in_f if self.group_size is None else self.group_size
        wg = w.reshape(out_f, in_f // g, g)
        scale, zero = scale_zero(wg.amin(-1, keepdim=True), wg.amax(-1, keepdim=True), self.w_bits, self.w_sym)
        lo, hi = qrange(self.w_bits, self.w_sym)
        q = torch.clamp(round_ste(wg / scale) + zero, lo, hi)
        return ((q - zero) * scale).reshape(out_f, in_f)

    def forward(self, x):
        if self.online is not None:
            x = self.online(x)
        if self.act_quant is not None:
            x = self.act_quant(x)
        w, b = self.merged_weight()
        return F.linear(x, self._fake_quant_weight(w), b)
