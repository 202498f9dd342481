"""Online linear transforms of activations: x -> (x * s) (L ⊗ R), computed without forming L ⊗ R.

Row-major vec(X)(L ⊗ R) = vec(Lᵀ X R): each token of size n1*n2 is reshaped to [n1, n2] and
multiplied on both sides. A weight consuming the transformed activation gets the inverse,
``W (L ⊗ R)^{-T} = W (L^{-T} ⊗ R^{-T})`` (with ``W / s`` per input column).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..core.io import register_module_type


def kron_apply(x: torch.Tensor, left: torch.Tensor | None, right: torch.Tensor | None) -> torch.Tensor:
    """``x (left ⊗ right)`` over the last dim; ``None`` stands for an identity factor."""
    n1 = left.shape[0] if left is not None else x.shape[-1] // right.shape[0]
    n2 = right.shape[0] if right is not None else x.shape[-1] // n1
    if n1 * n2 != x.shape[-1]:
        raise ValueError(f"transform of size {n1}x{n2} does not match the activation size {x.shape[-1]}")
    y = x.reshape(*x.shape[:-1], n1, n2)
    if right is not None:
        y = y @ right.to(y.dtype)
    if left is not None:
        y = left.to(y.dtype).transpose(0, 1) @ y
    return y.reshape(x.shape)


def kron_apply_weight_inverse(
    w: torch.Tensor, left: torch.Tensor | None, right: torch.Tensor | None, scale: torch.Tensor | None = None
) -> torch.Tensor:
    """The weight ``[out, in]`` that, fed the transformed input, gives the original output
    (computed in float64: merging must not cost accuracy)."""
    w64 = w.double()
    if scale is not None:
        w64 = w64 / scale.double()
    inv = lambda m: None if m is None else torch.linalg.inv(m.double()).T  # noqa: E731
    return kron_apply(w64, inv(left), inv(right)).to(w.dtype)


@register_module_type
class KroneckerTransform(nn.Module):
    """A fixed online transform ``x -> (x * scale)(left ⊗ right)`` (factors may be identity)."""

    def __init__(self, n1: int, n2: int, has_left: bool = True, has_right: bool = True, has_scale: bool = False):
        super().__init__()
        self.n1, self.n2 = n1, n2
        self.left = nn.Parameter(torch.eye(n1), requires_grad=False) if has_left else None
        self.right = nn.Parameter(torch.eye(n2), requires_grad=False) if has_right else None
        self.scale = nn.Parameter(torch.ones(n1 * n2), requires_grad=False) if has_scale else None

    @classmethod
    def from_factors(cls, left: torch.Tensor | None, right: torch.Tensor | None, n: int,
                     scale: torch.Tensor | None = None) -> KroneckerTransform:
        n1 = left.shape[0] if left is not None else n // right.shape[0]
        n2 = n // n1
        t = cls(n1, n2, left is not None, right is not None, scale is not None)
        with torch.no_grad():
            if left is not None:
                t.left.copy_(left)
            if right is not None:
                t.right.copy_(right)
            if scale is not None:
                t.scale.copy_(scale)
        return t

    def shared_copy(self) -> KroneckerTransform:
        """A new module holding the same parameters. Consumers of one activation each get their
        own module (effml.save records modules by path and lists a shared instance only once);
        the tensors stay shared, so they are stored once and re-shared on load."""
        t = KroneckerTransform(self.n1, self.n2, False, False, False)
        t.left, t.right, t.scale = self.left, self.right, self.scale
        return t

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.scale is not None:
            x = x * self.scale.to(x.dtype)
        return kron_apply(x, self.left, self.right)

    def merge_into(self, weight: torch.Tensor) -> torch.Tensor:
        """The weight that undoes this transform on its input."""
        return kron_apply_weight_inverse(weight, self.left, self.right, self.scale)

    @torch.no_grad()
    def dense(self) -> torch.Tensor:
        """The float64 ``[n, n]`` matrix ``T`` with ``self(x) == x @ T`` (what exporters store:
        formats without Kronecker factors take the transform as one dense matrix)."""
        n = self.n1 * self.n2
        ref = next((p for p in (self.left, self.right, self.scale) if p is not None), None)
        eye = torch.eye(n, dtype=torch.float64, device=None if ref is None else ref.device)
        if self.scale is not None:
            eye = eye * self.scale.double()
        if self.left is None and self.right is None:
            return eye
        # row i of T is the image of the unit vector e_i
        return kron_apply(eye, None if self.left is None else self.left.double(),
                          None if self.right is None else self.right.double())

    def extra_repr(self) -> str:
        return f"{self.n1}x{self.n2}, left={self.left is not None}, right={self.right is not None}"

    def effml_spec(self) -> dict:
        return {"n1": self.n1, "n2": self.n2, "has_left": self.left is not None,
                "has_right": self.right is not None, "has_scale": self.scale is not None}

    @classmethod
    def effml_build(cls, spec: dict) -> KroneckerTransform:
        return cls(**spec)
