"""Second-order helpers shared by the OBS-style methods (GPTQ, SparseGPT)."""

from __future__ import annotations

import torch


def damped_inverse_cholesky(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + damp * mean(diag H) * I)^-1``: the matrix whose rows drive
    the column-by-column error feedback of GPTQ and SparseGPT. ``h`` is left unchanged. Raises
    ``torch.linalg.LinAlgError`` if H is not positive definite even after damping."""
    h = h.clone()
    h.diagonal().add_(damp * torch.mean(torch.diag(h)))
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
