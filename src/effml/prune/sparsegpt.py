"""SparseGPT (Frantar & Alistarh, 2023): prune a linear column block by column block and update
the remaining weights with the inverse Hessian of the layer-wise reconstruction loss
(OBS update), so the layer output changes as little as possible."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..core.hessian import damped_inverse_cholesky, obs_sweep
from .masks import check_nm_shape, count_for


@torch.no_grad()
def sparsegpt_prune(
    weight: torch.Tensor,
    H: torch.Tensor,
    ratio: float,
    nm: tuple[int, int] | None = None,
    blocksize: int = 128,
    damping: float = 0.01,
    grid: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Pruned copy of ``weight`` ([out, in]). Unstructured: exactly round(ratio * numel) weights
    are removed, spread over column blocks in proportion to their width (each block picks its
    lowest w^2 / [H^-1]_jj^2); N:M: per row, N of every M columns, chosen as the sweep reaches
    them. Rows are independent, so a row slice of a fused linear can be pruned on its own.

    ``grid(j, column)``: for an already-quantized weight, rounds the kept weights of column ``j``
    to its quantization grid as the sweep reaches them (their rounding error is fed back like
    the pruned weights'), so the result stays exactly on the grid: prune + quantize jointly."""
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
    total = rows * cols
    d1 = torch.empty(0, dtype=W.dtype)  # diag of the current block's Hinv: the OBS saliency denominators

    def block_start(i1, i2, W1, Hinv1):
        nonlocal d1
        d1 = torch.diag(Hinv1)
        if nm is None:
            # cumulative rounding: the blocks' counts add up to exactly round(ratio * numel)
            k = count_for(total, ratio * i2 / cols) - count_for(total, ratio * i1 / cols)
            k = min(max(k, 0), W1.numel())
            if k:
                scores = (W1**2 / d1.reshape(1, -1) ** 2).reshape(-1)
                block = torch.zeros(W1.numel(), dtype=torch.bool)
                block[torch.topk(scores, k, largest=False).indices] = True
                mask[:, i1:i2] = block.view_as(W1)

    def column(j, i, W1):
        if nm is not None and i % nm[1] == 0:  # N:M: choose as the sweep reaches each group
            scores = W1[:, i : i + nm[1]] ** 2 / d1[i : i + nm[1]].reshape(1, -1) ** 2
            mask[:, j : j + nm[1]].scatter_(1, torch.topk(scores, nm[0], dim=1, largest=False).indices, True)
        return W1[:, i] if grid is None else grid(j, W1[:, i])

    obs_sweep(W, Hinv, blocksize, column, block_start, mask=mask)
    W[mask] = 0  # exact zeros (the update never touches a pruned column again, but be explicit)
    return W.to(weight.dtype)
