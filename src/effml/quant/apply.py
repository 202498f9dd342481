"""Steps every method shares: wrap linears, activation / KV quantizers, RTN or GPTQ weights."""

from __future__ import annotations

import logging
import time

import torch
import torch.nn as nn

from ..core.arch import get_arch
from ..core.calibrate import LayerwiseEngine
from ..core.hessian import Hessian
from ..core.surgery import block_linears, iter_linears, set_submodule
from .act import ActQuantizer
from .config import QuantConfig
from .gptq import gptq_quantize
from .kv import install_attention_quant
from .qlinear import QuantLinear

log = logging.getLogger(__name__)


def wrap_linears(model: nn.Module) -> dict[str, QuantLinear]:
    """Every decoder linear as a (still float) QuantLinear sharing the original parameters.
    Embeddings and lm_head stay in floating point (as in QuaRot / FlatQuant)."""
    out = {}
    for ref in list(iter_linears(model)):
        m = ref.module
        if not isinstance(m, QuantLinear):
            m = QuantLinear.from_linear(m)
            set_submodule(model, ref.name, m)
        out[ref.name] = m
    return out


def quant_linears(model: nn.Module) -> dict[str, QuantLinear]:
    return {ref.name: ref.module for ref in iter_linears(model) if isinstance(ref.module, QuantLinear)}


def set_activation_quant(model: nn.Module, cfg: QuantConfig, learnable: bool = False) -> None:
    for m in quant_linears(model).values():
        m.act_quant = ActQuantizer(cfg.a_bits, cfg.a_sym, cfg.a_clip, learnable) if cfg.a_bits < 16 else None


def set_kv_quant(model: nn.Module, cfg: QuantConfig, learnable: bool = False) -> None:
    if cfg.kv_bits < 16:
        install_attention_quant(model, cfg.kv_bits, cfg.kv_bits, cfg.kv_sym, cfg.kv_clip, learnable_clip=learnable)


def quantize_weights_rtn(model: nn.Module, cfg: QuantConfig) -> dict:
    start = time.perf_counter()
    err = 0.0
    for name, m in quant_linears(model).items():
        w = m.dequantized_weight().detach().clone()
        q = m.set_quantized_weight(w, cfg.w_bits, cfg.w_sym, cfg.group_size, mse=cfg.w_mse)
        err += float(((q.float() - w.float()) ** 2).sum())
        if not torch.isfinite(q).all():
            raise FloatingPointError(f"RTN produced NaN/inf in {name}: its weight is not finite")
    return {"weight_quantizer": "rtn", "weight_sq_error": err, "weight_time_s": time.perf_counter() - start}


def quantize_weights_gptq(model: nn.Module, cfg: QuantConfig, calib: torch.Tensor) -> dict:
    """GPTQ every decoder linear, block by block on the engine with propagate="compressed":
    Hessians come from the inputs the weight really sees (after online transforms and
    activation quantization, with earlier layers already quantized)."""
    arch = get_arch(model)
    start = time.perf_counter()
    losses: list[float] = []

    def callback(ctx):
        refs = block_linears(ctx.block, ctx.index, arch, model.config, prefix=f"{ctx.name}.")
        by_role = {r: ref for ref in refs for r in ref.roles}
        block_loss = 0.0
        for group in arch.sequential:
            mods = {}
            for role in group:
                ref = by_role.get(role)
                if ref is not None and isinstance(ref.module, QuantLinear):
                    mods[ref.name] = ref.module
            if not mods:
                continue
            hess = {n: Hessian(m.in_features, ctx.device) for n, m in mods.items()}

            def collect(name, module, inp, out, hess=hess):
                hess[name].add(module.prepare_input(inp).detach())

            with ctx.hooks(mods, collect):
                ctx.forward(keep=False)
            for n, m in mods.items():
                w = m.dequantized_weight().detach()
                q, scale, zero, loss = gptq_quantize(
                    w, hess[n].h, cfg.w_bits, cfg.w_sym, cfg.group_size, cfg.block_size, cfg.damp,
                    cfg.act_order, cfg.w_mse, name=n,
                )
                m.set_quantized_weight(q, cfg.w_bits, cfg.w_sym, cfg.group_size, scale=scale, zero=zero)
                block_loss += loss
        losses.append(block_loss)
        return {"gptq_loss": block_loss}

    engine = LayerwiseEngine(model, calib, device=cfg.device, batch_size=cfg.batch_size)
    engine.run(callback, propagate="compressed", desc="gptq")
    return {"weight_quantizer": "gptq", "gptq_loss_per_block": losses, "weight_time_s": time.perf_counter() - start}


def quantize_weights(model: nn.Module, cfg: QuantConfig, calib: torch.Tensor | None) -> dict:
    if cfg.w_bits >= 16:
        return {"weight_quantizer": "none"}
    if cfg.weight_quantizer == "gptq":
        return quantize_weights_gptq(model, cfg, require_calib(calib, "gptq"))
    return quantize_weights_rtn(model, cfg)


def require_calib(calib, method: str) -> torch.Tensor:
    if calib is None:
        raise ValueError(
            f"{method} needs calibration token ids: pass calib=effml.calibration_data(tokenizer, "
            "n_samples=..., seq_len=...) (a [n_samples, seq_len] LongTensor)"
        )
    if not isinstance(calib, torch.Tensor) or calib.dim() != 2:
        raise ValueError(f"calib must be a [n_samples, seq_len] tensor of token ids, got {type(calib).__name__}")
    return calib
