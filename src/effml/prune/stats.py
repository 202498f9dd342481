"""Per-linear input statistics gathered with the core engine's hooks during one block forward."""

from __future__ import annotations

import torch

from ..core.calibrate import BlockContext
from ..core.hessian import Hessian
from .units import Unit


class InputSqNorms:
    """sum over calibration tokens of x_j^2 per input channel, per module (Wanda / OWL)."""

    def __init__(self):
        self.sq: dict[str, torch.Tensor] = {}

    def __call__(self, name, module, inp, out):
        x = inp.detach().reshape(-1, inp.shape[-1]).to("cpu", torch.float64)
        s = (x * x).sum(0)
        self.sq[name] = s if name not in self.sq else self.sq[name] + s


class Hessians:
    """SparseGPT's H = 2/n X X^T per module."""

    def __init__(self):
        self.acc: dict[str, Hessian] = {}

    def __call__(self, name, module, inp, out):
        if name not in self.acc:
            self.acc[name] = Hessian(inp.shape[-1])
        self.acc[name].add(inp)

    def H(self, name: str) -> torch.Tensor:
        return self.acc[name].h


def block_units(units: list[Unit], index: int) -> list[Unit]:
    return [u for u in units if u.block == index]


def collect(ctx: BlockContext, units: list[Unit], collector) -> None:
    """Run the block over the calibration batches once with ``collector`` hooked on its linears."""
    modules = {u.ref.path: u.ref.module for u in units}
    with ctx.hooks(modules, collector):
        ctx.forward(keep=False)
