"""SparseGPT (Frantar & Alistarh, 2023): prune a linear column block by column block and update
the remaining weights with the inverse Hessian of the layer-wise reconstruction loss
(OBS update), so the layer output changes as little as possible."""

from __future__ import annotations

import torch

from ..core.hessian import damped_inverse_cholesky
from .masks import check_nm_shape, count_for


class HessianAccumulator:
    """H = 2/n sum_t x_t x_t^T over the calibration tokens, in float64."""

    def __init__(self, in_features: int):
        self.H = torch.zeros(in_features, in_features, dtype=torch.float64)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).to("cpu", torch.float64)
        t = x.shape[0]
        self.H.mul_(self.n / (self.n + t))
        self.n += t
        x = x * (2.0 / self.n) ** 0.5
        self.H.addmm_(x.T, x)


@torch.no_grad()
def sparsegpt_prune(
    weight: torch.Tensor,
    H: torch.Tensor,
    ratio: float,
    nm: tuple[int, int] | None = None,
    blocksize: int = 128,
    damping: float = 0.01,
) -> torch.Tensor:
    """Pruned copy of ``weight`` ([out, in]). Unstructured: exactly round(ratio * numel) weights
    are removed, spread over column blocks in proportion to their width (each block picks its
    lowest w^2 / [H^-1]_jj^2); N:M: per row, N of every M columns, chosen as the sweep reaches
    them. Rows are independent, so a row slice of a fused linear can be pruned on its own."""
    if blocksize < 1:
        raise ValueError(f"blocksize must be >= 1, got {blocksize}")
    if damping <= 0:
        raise ValueError(f"damping must be > 0, got {damping}")
    rows, cols = weight.shape
    if nm is not None:
        check_nm_shape(cols, nm[1])
        if blocksize % nm[1]:
            raise ValueError(f"blocksize {blocksize} must be a multiple of M={nm[1]} for N:M SparseGPT")
    W = weight.detach().to(torch.float64).clone()
    H = H.to(torch.float64).clone()
    dead = torch.diag(H) == 0  # inputs never active: their weights cannot matter
    H[dead, dead] = 1
    W[:, dead] = 0
    Hinv = damped_inverse_cholesky(H, damping)
    mask = torch.zeros_like(W, dtype=torch.bool)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        d1 = torch.diag(Hinv1)
        if nm is None:
            # cumulative rounding: the blocks' counts add up to exactly `total`
            k = count_for(rows * cols, ratio * i2 / cols) - count_for(rows * cols, ratio * i1 / cols)
            k = min(max(k, 0), W1.numel())
            scores = W1 ** 2 / d1.reshape(1, -1) ** 2
            mask1 = torch.zeros(W1.numel(), dtype=torch.bool)
            if k:
                mask1[torch.topk(scores.reshape(-1), k, largest=False).indices] = True
            mask1 = mask1.view_as(W1)
        else:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
        for i in range(i2 - i1):
            w = W1[:, i]
            d = Hinv1[i, i]
            if nm is not None and i % nm[1] == 0:
                scores = W1[:, i : i + nm[1]] ** 2 / d1[i : i + nm[1]].reshape(1, -1) ** 2
                idx = torch.topk(scores, nm[0], dim=1, largest=False).indices
                mask1.scatter_(1, i + idx, True)
            q = w.clone()
            q[mask1[:, i]] = 0
            Q1[:, i] = q
            err = (w - q) / d
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i1:i2] = Q1
        mask[:, i1:i2] = mask1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    W[mask] = 0  # exact zeros (the update never touches a pruned column again, but be explicit)
    return W.to(weight.dtype)
