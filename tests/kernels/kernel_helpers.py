"""Shared by the kernel tests: the odd shapes of the brief, error measures, poisoned outputs."""

import torch

from effml.quant.hadamard import near_square_factors, random_hadamard

MS = (1, 7, 33)
KS = (576, 1536)
NS = (192, 576, 1536)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| / max |ref|: the error relative to the output's scale."""
    return ((out.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-30)).item()


# bf16 keeps 8 significant bits: one rounding of the output alone is up to 2^-8 = 0.4% relative
TOL = {torch.float32: 1e-3, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def factors(k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """FlatQuant-style Kronecker factors for size k (24 x 24 for 576, 32 x 48 for 1536), not
    orthogonal-only: a random scaling makes them general invertible matrices."""
    g = torch.Generator().manual_seed(seed)
    n1, n2 = near_square_factors(k)
    left = random_hadamard(n1, g).float() * (0.5 + torch.rand(n1, generator=g))[None, :]
    right = random_hadamard(n2, g).float() * (0.5 + torch.rand(n2, generator=g))[None, :]
    return left, right


def activations(m: int, k: int, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    """Gaussian tokens with a few outlier channels and one near-zero token (scale clamping)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    x[:, torch.randint(0, k, (3,), generator=g)] *= 20.0
    if m > 2:
        x[1] = 0.0
    return x.to(dtype)


def random_packed(rows: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (rows, k // 2), dtype=torch.uint8, generator=g)
