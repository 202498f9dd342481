"""OWL's layer-wise outlier distribution (LOD): per block, the percentage of Wanda scores
|W| * ||X||_2 above M times their mean, over all the block's linears, on the dense model."""

from __future__ import annotations

import logging

import torch

from ..core.calibrate import LayerwiseEngine
from .masks import wanda_scores
from .stats import InputSqNorms, block_units, collect
from .units import Unit

log = logging.getLogger(__name__)


def outlier_ratio(scores: list[torch.Tensor], m: float) -> float:
    a = torch.cat([s.reshape(-1).float() for s in scores])
    return float((a > m * a.mean()).float().mean().item() * 100.0)


def layer_outlier_ratios(engine: LayerwiseEngine, units: list[Unit], m: float = 5.0) -> list[float]:
    """LOD per block, with dense-model inputs (propagate="original"), as in the OWL code."""
    if m <= 0:
        raise ValueError(f"OWL's outlier threshold M must be > 0, got {m}")
    ratios: list[float] = []

    def callback(ctx):
        mine = block_units(units, ctx.index)
        norms = InputSqNorms()
        collect(ctx, mine, norms)
        lod = outlier_ratio([wanda_scores(u.weight, norms.sq[u.ref.path]) for u in mine], m)
        ratios.append(lod)
        return {"LOD%": lod}

    engine.run(callback, propagate="original", desc="OWL outlier ratios")
    return ratios
