"""Second-order helpers shared by the OBS-style methods (GPTQ, SparseGPT): the input Hessian,
its damped inverse, and the column sweep with error feedback."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch


class Hessian:
    """Running ``H = 2/n Σ x xᵀ`` (float64) over the rows (tokens) of a linear's inputs."""

    def __init__(self, n: int, device: torch.device | str = "cpu"):
        self.h = torch.zeros(n, n, dtype=torch.float64, device=device)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).to(self.h.device, torch.float64)
        total = self.n + x.shape[0]
        self.h.mul_(self.n / total)
        x = x * math.sqrt(2.0 / total)
        self.h.addmm_(x.T, x)
        self.n = total


def damped_inverse_cholesky(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + damp * mean(diag H) * I)^-1``: the matrix whose rows drive
    the column-by-column error feedback of GPTQ and SparseGPT. ``h`` is left unchanged. Raises
    ``torch.linalg.LinAlgError`` if H is not positive definite even after damping."""
    h = h.clone()
    h.diagonal().add_(damp * torch.mean(torch.diag(h)))
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)


def obs_sweep(
    w: torch.Tensor, hinv: torch.Tensor, block_size: int,
    column: Callable[[int, int, torch.Tensor], torch.Tensor],
    block_start: Callable[[int, int, torch.Tensor, torch.Tensor], None] | None = None,
    mask: torch.Tensor | None = None,
) -> float:
    """Compress ``w`` [out, in] (float64, in place) column by column with OBS error feedback.

    ``column(j, i, w1)`` returns the compressed column ``j`` (``i`` = its index in the current
    block, ``w1`` = the block with the feedback of its earlier columns already applied); its error
    ``(w_j - c) / hinv_jj`` updates the block's later columns at once and the columns after the
    block in one matmul at the block's end (the "lazy batch" update). ``block_start(i1, i2, w1,
    hinv1)`` runs before each block (e.g. SparseGPT's mask selection). ``mask`` ([out, in], True =
    removed; read column by column as the sweep reaches it, so ``block_start``/``column`` may fill
    it in on the way) forces those weights to exactly 0 whatever ``column`` returns; their whole
    value is error fed back to the kept weights. It serves SparseGPT (mask chosen on the way) and
    mask-aware GPTQ on a pruned weight (mask fixed up front: the joint sparsify + quantize of the
    SparseGPT paper), so pruning and quantization share one sweep. ``hinv`` is the upper
    Cholesky factor from :func:`damped_inverse_cholesky`. Returns GPTQ's error proxy
    ``Σ ||w_j - c||² / hinv_jj² / 2``.
    """
    n = w.shape[1]
    loss = 0.0
    for i1 in range(0, n, block_size):
        i2 = min(i1 + block_size, n)
        w1 = w[:, i1:i2].clone()
        q1 = torch.zeros_like(w1)
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        if block_start is not None:
            block_start(i1, i2, w1, hinv1)
        for i in range(i2 - i1):
            wc = w1[:, i]
            qc = column(i1 + i, i, w1)
            if mask is not None:
                qc = qc.masked_fill(mask[:, i1 + i], 0.0)
            q1[:, i] = qc
            d = hinv1[i, i]
            loss += float(((wc - qc) ** 2).sum() / d**2) / 2
            e = (wc - qc) / d
            w1[:, i:] -= e[:, None] @ hinv1[i, i:][None, :]
            err1[:, i] = e
        w[:, i1:i2] = q1
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return loss
