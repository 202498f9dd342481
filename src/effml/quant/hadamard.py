"""Orthogonal rotations for any size: randomized Hadamard ⊗ small random orthogonal, and a
near-square factorisation so a rotation of size n runs as two small Kronecker factors."""

from __future__ import annotations

import math

import torch


def hadamard(n: int) -> torch.Tensor:
    """Sylvester Hadamard matrix (n a power of two), unnormalised."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"Sylvester Hadamard needs a power of two, got {n}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def random_orthogonal(n: int, generator: torch.Generator) -> torch.Tensor:
    """Haar-random orthogonal matrix (QR of a Gaussian with the sign fix), float64."""
    a = torch.randn(n, n, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(a)
    d = torch.diagonal(r)
    return (q * torch.where(d < 0, -1.0, 1.0).to(q.dtype)).contiguous()


def random_hadamard(n: int, generator: torch.Generator) -> torch.Tensor:
    """Orthogonal ``diag(±1) (H_{2^k} ⊗ Q_m) / sqrt(2^k)`` with ``n = 2^k * m``, m odd and Q_m a
    random orthogonal matrix: a Hadamard rotation for powers of two, and for sizes like 576 =
    64*9 or 1536 = 512*3 the same spreading over 2^k channels mixed by a small rotation."""
    k = (n & -n)  # largest power-of-two divisor
    m = n // k
    h = hadamard(k) / math.sqrt(k)
    rot = torch.kron(h, random_orthogonal(m, generator)) if m > 1 else h
    signs = torch.randint(0, 2, (n,), generator=generator, dtype=torch.float64) * 2 - 1
    return signs[:, None] * rot


def near_square_factors(n: int) -> tuple[int, int]:
    """(n1, n2) with n1 * n2 = n, n1 <= n2 and n1 as close to sqrt(n) as possible (FlatQuant's
    ``get_decompose_dim``): 576 -> (24, 24), 1536 -> (32, 48), a prime p -> (1, p)."""
    n1 = int(math.isqrt(n))
    while n % n1:
        n1 -= 1
    return n1, n // n1
