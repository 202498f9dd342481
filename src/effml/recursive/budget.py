"""``recursify(param_budget=...)``: spend a parameter budget on LoRA ranks, per depth and target.

The tied base costs what it costs; what the budget leaves goes, one rank-1 component at a time,
to the (depth, target) whose next component recovers the most *activation-weighted* residual
energy per parameter. The energy of component k is s_k², the k-th singular value of the same
whitened residual the activation-aware init factorises (``R L`` with ``G + damp·mean(diag G)·I =
L Lᵀ``, G = E[x xᵀ] of the original inputs): s_k² is exactly what that component removes from
E||(R - BA) x||², the output error of the linear. A rank-1 component of an ``out x in`` matrix
costs ``in + out`` parameters (plus ``out`` once for the per-depth bias correction a linear with
a bias gets with its first component).

The greedy choice is optimal whenever every candidate costs the same per component (the
per-candidate energies are non-increasing, so it is an exchange argument); with different costs
it is the usual ratio greedy for a knapsack, not an exact solution. A candidate whose next
component no longer fits is dropped (its later components never cost less), and the loop goes on
with the ones that still fit, so the budget is used up to less than one component.
"""

from __future__ import annotations

import heapq
from collections.abc import Hashable, Mapping, Sequence

import torch


def whitened_energies(residual: torch.Tensor, gram: torch.Tensor, damp: float = 0.01,
                      max_rank: int | None = None) -> list[float]:
    """Squared singular values of the whitened residual ``R L`` (the energies the asvd init's
    components remove, in order), at most ``max_rank`` of them, float64."""
    g = gram.to(torch.float64).clone()
    g.diagonal().add_(damp * g.diagonal().mean().clamp_min(1e-12))
    chol = torch.linalg.cholesky(g)
    s = torch.linalg.svdvals(residual.to(torch.float64) @ chol)
    e = s.square()
    if max_rank is not None:
        e = e[:max_rank]
    return e.tolist()


def whitened_output_energy(weight: torch.Tensor, gram: torch.Tensor, damp: float = 0.01) -> float:
    """``||W L||_F²`` = E||W x||² (damped as in :func:`whitened_energies`): the energy of the
    original linear's outputs, the scale of ``budget_metric="relative"``."""
    g = gram.to(torch.float64).clone()
    g.diagonal().add_(damp * g.diagonal().mean().clamp_min(1e-12))
    w = weight.to(torch.float64)
    return float(((w @ g) * w).sum())


def greedy_ranks(
    energies: Mapping[Hashable, Sequence[float]],
    costs: Mapping[Hashable, tuple[int, int]],
    budget: int,
) -> tuple[dict[Hashable, int], int]:
    """Ranks per candidate and the parameters they use, spending at most ``budget``.

    ``energies[c]``: the energy each further component of candidate ``c`` recovers
    (non-increasing); ``costs[c]``: (cost of its first component, cost of each later one). At each
    step the candidate with the largest next-energy / cost among those that still fit gets one
    more component; ties go to the candidate listed first. Zero-energy components are never bought.
    """
    order = {c: i for i, c in enumerate(energies)}
    ranks = dict.fromkeys(energies, 0)
    used = 0

    def entry(c):
        k = ranks[c]
        if k >= len(energies[c]) or energies[c][k] <= 0:
            return None
        cost = costs[c][0] if k == 0 else costs[c][1]
        return (-energies[c][k] / cost, order[c], cost, c)

    heap = [e for e in (entry(c) for c in energies) if e is not None]
    heapq.heapify(heap)
    while heap:
        _, _, cost, c = heapq.heappop(heap)
        if used + cost > budget:
            continue  # never fits again: the remaining budget only shrinks, later components cost no less
        ranks[c] += 1
        used += cost
        nxt = entry(c)
        if nxt is not None:
            heapq.heappush(heap, nxt)
    return ranks, used
