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
from .apply import as_quant, quantize_weights, require_calib, set_activation_quant, set_kv_quant, wrap_linears
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


def _groups(block, index: int, model, arch) -> list[tuple[str, list, str | None]]:
    """Per block: (key, consumer modules, norm path) for each norm-fed input, then ("down",
    [down], None) whose 1/s goes into up_proj's rows."""
    refs = block_linears(block, index, arch, model.config)
    by_role = {r: ref for ref in refs for r in ref.roles}
    groups = []
    for key, norm in arch.norms.items():
        mods = list({id(by_role[r].module): by_role[r].module for r in norm.feeds if r in by_role}.values())
        if mods:
            groups.append((key, mods, norm.path))
    if "down" in by_role and "up" in by_role:
        groups.append(("down", [by_role["down"].module], None))
    return groups


@torch.no_grad()
def _collect_absmax(ctx, model) -> dict[str, torch.Tensor]:
    """Per group of this block: max |x_j| over the calibration tokens of the consumers' input."""
    groups = _groups(ctx.block, ctx.index, model, get_arch(model))
    absmax: dict[str, torch.Tensor] = {}

    def fn(key, module, inp, out):
        m = inp.abs().reshape(-1, inp.shape[-1]).amax(0).float().cpu()
        absmax[key] = m if key not in absmax else torch.maximum(absmax[key], m)

    with ctx.hooks({key: mods[0] for key, mods, _ in groups}, fn):
        ctx.forward(keep=False)
    return absmax


def _scale_cols(w: torch.Tensor, s: torch.Tensor) -> None:
    w.data = (w.double() * s.to(w.device)).to(w.dtype)


@torch.no_grad()
def _smooth(model, cfg: SmoothQuantConfig, absmax: list[dict[str, torch.Tensor]]) -> int:
    """Fold the scales in. The depths of a recursive model that share a block share its
    weights, so they get ONE scale per group (from the max over all their inputs), applied once
    to each shared tensor (base weight, tied norm, up rows); per-depth tensors (untied norms,
    LoRA factors) get it at each depth, so every depth's function is unchanged."""
    arch = get_arch(model)
    layers = model.get_submodule(arch.layers)
    classes: dict[int, list[int]] = {}  # depths that share their first linear's base
    for d, layer in enumerate(layers):
        first = as_quant(_groups(layer, d, model, arch)[0][1][0])
        classes.setdefault(id(first), []).append(d)
    done: set[tuple[int, str]] = set()  # (tensor, group) pairs already scaled

    def once(t: torch.Tensor, key: str) -> bool:
        if (id(t), key) in done:
            return False
        done.add((id(t), key))
        return True

    n = 0
    for depths in classes.values():
        per_depth = [_groups(layers[d], d, model, arch) for d in depths]
        for gi, (key, mods, _) in enumerate(per_depth[0]):
            x_absmax = torch.stack([absmax[d][key] for d in depths]).amax(0)
            bases = [as_quant(m) for m in mods]
            w_absmax = torch.cat([b.weight.float() for b in bases]).abs().amax(0)
            s = smoothing_scale(x_absmax.to(w_absmax.device), w_absmax, cfg.alpha).double()
            for b in bases:
                if once(b.weight, key):
                    _scale_cols(b.weight, s)
            n += 1
            for d, groups in zip(depths, per_depth):
                _, dmods, norm_path = groups[gi]
                for m in dmods:  # this depth's LoRA sees x / s too: A <- A s keeps x Aᵀ
                    for a in getattr(m, "lora_A", {}).values():
                        if once(a, key):
                            _scale_cols(a, s)
                if norm_path is not None:
                    norm = get_submodule(layers[d], norm_path)
                    if once(norm.weight, key):
                        eff = (norm.weight.double() + arch.norm_offset) / s.to(norm.weight.device)
                        norm.weight.data = (eff - arch.norm_offset).to(norm.weight.dtype)
                else:
                    _divide_up_rows(layers[d], d, model, arch, s, lambda t, k=key: once(t, k))
    return n


def _divide_up_rows(layer, d, model, arch, s, once) -> None:
    """up_proj's output (so down_proj's input) / s: its shared rows and bias once, this depth's
    LoRA B rows and bias correction for the up role."""
    ref = next(r for r in block_linears(layer, d, arch, model.config) if "up" in r.roles)
    rows = ref.roles["up"]
    up = as_quant(ref.module)
    sd = s.to(up.weight.device)
    if once(up.weight):
        up.weight.data[rows] = (up.weight.data[rows].double() / sd[:, None]).to(up.weight.dtype)
    if up.bias is not None and once(up.bias):
        up.bias.data[rows] = (up.bias.data[rows].double() / sd).to(up.bias.dtype)
    lora_b = getattr(ref.module, "lora_B", {})
    if "up" in lora_b and once(lora_b["up"]):
        b = lora_b["up"]
        b.data = (b.double() / sd[:, None]).to(b.dtype)
    lora_bias = getattr(ref.module, "lora_bias", {})
    if "up" in lora_bias and once(lora_bias["up"]):
        c = lora_bias["up"]
        c.data = (c.double() / sd).to(c.dtype)


@register_method("smoothquant", SmoothQuantConfig)
def smoothquant(model, cfg: SmoothQuantConfig, calib):
    calib = require_calib(calib, "smoothquant")
    wrap_linears(model)
    engine = LayerwiseEngine(model, calib, device=cfg.device, batch_size=cfg.batch_size)
    absmax: list[dict[str, torch.Tensor]] = []
    # statistics of every block first (inputs from the original model), then one scale per
    # shared group: with "original" propagation this equals smoothing block by block
    engine.run(lambda ctx: absmax.append(_collect_absmax(ctx, model)), propagate="original", desc="smoothquant")
    _smooth(model, cfg, absmax)
    set_activation_quant(model, cfg)
    set_kv_quant(model, cfg)
    return quantize_weights(model, cfg, calib)
