"""SmoothQuant (Xiao et al., 2023): move activation outliers into the weights with a per-channel
scale, ``X W^T = (X / s)(W s)^T``, ``s_j = max|X_j|^α / max|W_j|^(1-α)``.

``1/s`` is folded into whatever produces the activation: the norm in front of q/k/v and of
gate/up (effective scale, so Gemma's ``1 + w`` norms work), and up_proj's output rows for the
down_proj input. The o_proj input is not smoothed: with grouped-query attention its channels
come from shared value heads, and the paper smooths only norm-fed inputs and the MLP.
Activations are then quantized per token and weights by RTN or GPTQ.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core.arch import get_arch, get_submodule
from ..core.calibrate import LayerwiseEngine
from ..core.surgery import block_linears
from .api import register_method
from .apply import quantize_weights, require_calib, set_activation_quant, set_kv_quant, wrap_linears
from .config import QuantConfig


@dataclass
class SmoothQuantConfig(QuantConfig):
    alpha: float = 0.5  # migration strength: 0 keeps activations, 1 moves everything to weights

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")


def smoothing_scale(x_absmax: torch.Tensor, w_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    return (x_absmax.clamp_min(1e-5).pow(alpha) / w_absmax.clamp_min(1e-5).pow(1 - alpha)).clamp_min(1e-5)


@torch.no_grad()
def _smooth_block(ctx, model, cfg: SmoothQuantConfig) -> dict:
    arch = get_arch(model)
    refs = block_linears(ctx.block, ctx.index, arch, model.config)
    by_role = {r: ref for ref in refs for r in ref.roles}
    groups = []  # (consumers, how to fold 1/s)
    for norm in arch.norms.values():
        mods = list({id(by_role[r].module): by_role[r].module for r in norm.feeds if r in by_role}.values())
        if mods:
            groups.append((mods, ("norm", norm.path)))
    if "down" in by_role and "up" in by_role:
        groups.append(([by_role["down"].module], ("up", by_role["up"])))
    absmax: dict[int, torch.Tensor] = {}

    def fn(name, module, inp, out):
        m = inp.abs().reshape(-1, inp.shape[-1]).amax(0).float()
        absmax[int(name)] = m if int(name) not in absmax else torch.maximum(absmax[int(name)], m)

    with ctx.hooks({str(i): g[0][0] for i, g in enumerate(groups)}, fn):
        ctx.forward(keep=False)
    for i, (mods, (kind, where)) in enumerate(groups):
        w_absmax = torch.cat([m.weight.float() for m in mods]).abs().amax(0)
        s = smoothing_scale(absmax[i].to(w_absmax.device), w_absmax, cfg.alpha).double()
        for m in mods:
            m.weight.data = (m.weight.double() * s).to(m.weight.dtype)
        if kind == "norm":
            norm = get_submodule(ctx.block, where)
            eff = (norm.weight.double() + arch.norm_offset) / s
            norm.weight.data = (eff - arch.norm_offset).to(norm.weight.dtype)
        else:
            rows = where.roles["up"]
            up = where.module
            up.weight.data[rows] = (up.weight.data[rows].double() / s[:, None]).to(up.weight.dtype)
            if up.bias is not None:
                up.bias.data[rows] = (up.bias.data[rows].double() / s).to(up.bias.dtype)
    return {"groups": len(groups)}


@register_method("smoothquant", SmoothQuantConfig)
def smoothquant(model, cfg: SmoothQuantConfig, calib):
    calib = require_calib(calib, "smoothquant")
    wrap_linears(model)
    engine = LayerwiseEngine(model, calib, device=cfg.device, batch_size=cfg.batch_size)
    engine.run(lambda ctx: _smooth_block(ctx, model, cfg), propagate="original", desc="smoothquant")
    set_activation_quant(model, cfg)
    set_kv_quant(model, cfg)
    return quantize_weights(model, cfg, calib)
