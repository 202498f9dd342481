"""Pruning masks from importance scores: unstructured (per matrix or per output row) and N:M
(N of every M consecutive input weights of a row). A mask is True where a weight is removed."""

from __future__ import annotations

import re

import torch


def parse_pattern(pattern: str | None) -> tuple[int, int] | None:
    """``None`` / ``"unstructured"`` -> None; ``"N:M"`` -> (N, M) with 0 < N < M."""
    if pattern is None or pattern == "unstructured":
        return None
    m = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", str(pattern))
    if not m:
        raise ValueError(f"pattern must be None, 'unstructured' or 'N:M' such as '2:4' or '4:8', got {pattern!r}")
    n, mm = int(m.group(1)), int(m.group(2))
    if not 0 < n < mm:
        raise ValueError(f"an N:M pattern needs 0 < N < M, got {pattern!r}")
    return n, mm


def check_nm_shape(in_features: int, m: int, name: str = "weight") -> None:
    if in_features % m:
        raise ValueError(
            f"{name}: N:M sparsity groups M={m} consecutive input weights, but the input dimension "
            f"{in_features} is not divisible by {m}; choose an M that divides it"
        )


def count_for(numel: int, ratio: float) -> int:
    """Weights to remove from ``numel`` at ``ratio`` (nearest integer)."""
    return int(round(numel * ratio))


def lowest_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Exactly the ``k`` lowest entries of ``scores`` (ties broken by position)."""
    flat = scores.reshape(-1)
    mask = torch.zeros(flat.numel(), dtype=torch.bool, device=scores.device)
    if k > 0:
        idx = torch.topk(flat, k, largest=False, sorted=False).indices
        mask[idx] = True
    return mask.view_as(scores)


def row_mask(scores: torch.Tensor, ratio: float) -> torch.Tensor:
    """Per output row (Wanda's comparison group), the lowest scores: round(ratio * numel) in
    all, k or k+1 per row. The rows that give one more are those whose next-lowest score is
    smallest, so the matrix hits its ratio exactly instead of to within 1/cols."""
    rows, cols = scores.shape
    total = count_for(scores.numel(), ratio)
    k, extra = divmod(total, rows)
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if total == 0:
        return mask
    take = min(k + 1, cols)
    vals, idx = torch.topk(scores, take, dim=1, largest=False, sorted=True)
    counts = torch.full((rows,), k, dtype=torch.long, device=scores.device)
    if extra:
        counts[torch.topk(vals[:, k], extra, largest=False).indices] += 1
    keep = torch.arange(take, device=scores.device).reshape(1, -1) < counts.reshape(-1, 1)
    mask.scatter_(1, idx, keep)
    return mask


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """In every group of ``m`` consecutive input columns of each row, the ``n`` lowest scores."""
    rows, cols = scores.shape
    check_nm_shape(cols, m)
    groups = scores.reshape(rows, cols // m, m)
    mask = torch.zeros_like(groups, dtype=torch.bool)
    if n > 0:
        idx = torch.topk(groups, n, dim=2, largest=False, sorted=False).indices
        mask.scatter_(2, idx, True)
    return mask.reshape(rows, cols)


def is_nm(weight: torch.Tensor, n: int, m: int) -> bool:
    """Whether every group of ``m`` consecutive input weights of each row has >= ``n`` zeros."""
    rows, cols = weight.shape
    if cols % m:
        return False
    zeros = (weight.reshape(rows, cols // m, m) == 0).sum(-1)
    return bool((zeros >= n).all())


def magnitude_mask(weight: torch.Tensor, ratio: float, nm: tuple[int, int] | None = None) -> torch.Tensor:
    """Smallest |W|: the round(ratio * numel) lowest of the whole matrix, or N:M per group."""
    scores = weight.abs()
    if nm is not None:
        return nm_mask(scores, *nm)
    return lowest_mask(scores, count_for(weight.numel(), ratio))


def wanda_scores(weight: torch.Tensor, input_sq_norm: torch.Tensor) -> torch.Tensor:
    """|W_ij| * ||X_j||_2, the Wanda importance (``input_sq_norm`` = sum of x_j^2 over tokens)."""
    return weight.abs().float() * input_sq_norm.float().sqrt().reshape(1, -1)


def wanda_mask(weight: torch.Tensor, input_sq_norm: torch.Tensor, ratio: float, nm: tuple[int, int] | None = None):
    scores = wanda_scores(weight, input_sq_norm)
    return nm_mask(scores, *nm) if nm is not None else row_mask(scores, ratio)
