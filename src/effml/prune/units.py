"""The prunable matrices of a model: one per role of every decoder linear (a fused linear gives
one unit per role, as a row slice), in block and role order, matching :func:`esd` records."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from ..core.surgery import LinearRef, iter_linears


@dataclass
class Unit:
    block: int
    role: str
    name: str
    ref: LinearRef
    rows: slice

    @property
    def weight(self) -> torch.Tensor:
        """The role's rows of the module weight (a view)."""
        return self.ref.module.weight.data[self.rows]

    def set_weight(self, w: torch.Tensor) -> None:
        self.ref.module.weight.data[self.rows] = w.to(self.ref.module.weight.dtype)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.weight.shape)

    @property
    def numel(self) -> int:
        return self.weight.numel()

    def zeros(self) -> int:
        return int((self.weight == 0).sum().item())


def prunable_units(model: nn.Module) -> list[Unit]:
    units = []
    for ref in iter_linears(model):
        for role, rows in ref.roles.items():
            name = f"{ref.name}[{role}]" if ref.fused else ref.name
            units.append(Unit(ref.block, role, name, ref, rows))
    return units
