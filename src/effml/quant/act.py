"""Activation quantizer: per-token (per row of the last dim) fake quantization with clipping."""

from __future__ import annotations

import torch
import torch.nn as nn

from ..core.io import register_module_type
from .quantizers import check_bits, fake_quant_rows

# FlatQuant's learnable clip starts at sigmoid(4.0) ~ 0.982.
LEARNABLE_CLIP_INIT = 4.0


@register_module_type
class ActQuantizer(nn.Module):
    """Quantize-dequantize each row of the input (one token, or one token of one head for K/V).

    ``clip``: fixed fraction of each row's range kept (QuaRot uses 0.9 for activations); with
    ``learnable`` the fraction is ``sigmoid(clip_logit)``, trained by calibration (FlatQuant's LAC).
    """

    def __init__(self, bits: int, sym: bool = True, clip: float = 1.0, learnable: bool = False):
        super().__init__()
        self.bits = check_bits(bits, "activation bits")
        if not 0.0 < clip <= 1.0:
            raise ValueError(f"activation clip ratio must be in (0, 1], got {clip}")
        self.sym, self.clip, self.learnable = sym, float(clip), learnable
        self.ste = False  # straight-through rounding, switched on while calibrating
        if learnable:
            self.clip_logit = nn.Parameter(torch.full((1,), LEARNABLE_CLIP_INIT))

    def clip_ratio(self) -> torch.Tensor | float:
        return torch.sigmoid(self.clip_logit) if self.learnable else self.clip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bits >= 16:
            return x
        return fake_quant_rows(x, self.bits, self.sym, self.clip_ratio(), ste=self.ste).to(x.dtype)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, sym={self.sym}, clip={'learned' if self.learnable else self.clip}"

    def effml_spec(self) -> dict:
        return {"bits": self.bits, "sym": self.sym, "clip": self.clip, "learnable": self.learnable}

    @classmethod
    def effml_build(cls, spec: dict) -> ActQuantizer:
        return cls(**spec)
