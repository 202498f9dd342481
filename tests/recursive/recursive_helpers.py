import copy

import torch

from effml.testing import tiny_model


def tiny_with_biases(family: str, seed: int = 0):
    """A tiny model whose projection biases (qwen2 q/k/v) are random too, so a tied bias that
    differs per depth is exercised rather than a zero-initialised one."""
    model = tiny_model(family, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def copy_of(model):
    return copy.deepcopy(model)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()
