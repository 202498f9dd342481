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


def as_quant(module: nn.Module) -> QuantLinear | None:
    """The QuantLinear doing a decoder linear's product: the module itself, or the shared
    ``base`` of a recursive model's per-depth linear; None if it is not wrapped yet."""
    if isinstance(module, QuantLinear):
        return module
    base = getattr(module, "base", None)
    return base if isinstance(base, QuantLinear) else None


def wrap_linears(model: nn.Module) -> dict[str, QuantLinear]:
    """Every decoder linear as a (still float) QuantLinear sharing the original parameters.
    Embeddings and lm_head stay in floating point (as in QuaRot / FlatQuant).

    Linears whose weight several depths share (``effml.recursify``) get ONE QuantLinear for the
    whole group, as the ``base`` of each depth's :class:`~effml.recursive.lora.DepthLoRALinear`
    (rank 0 where a depth has no LoRA): the shared block is quantized once and stays shared,
    while the per-depth LoRA factors stay in floating point."""
    from ..recursive.lora import DepthLoRALinear

    refs = list(iter_linears(model))
    uses: dict[int, int] = {}
    for ref in refs:
        if as_quant(ref.module) is None:
            uses[id(ref.module.weight)] = uses.get(id(ref.module.weight), 0) + 1
    out: dict[str, QuantLinear] = {}
    by_weight: dict[int, QuantLinear] = {}
    for ref in refs:
        m = ref.module
        q = as_quant(m)
        if q is None:
            key = id(m.weight)
            q = by_weight.get(key)
            if q is None:
                q = by_weight[key] = QuantLinear.from_linear(m)
            if isinstance(m, DepthLoRALinear):
                m.use_base(q)
            elif uses[key] > 1:
                roles = {r: sl.indices(m.out_features)[:2] for r, sl in ref.roles.items()}
                wrapper = DepthLoRALinear(m.weight, m.bias, roles, {})
                wrapper.use_base(q)
                set_submodule(model, ref.name, wrapper)
            else:
                set_submodule(model, ref.name, q)
        out[ref.name] = q
    return out


def quant_linears(model: nn.Module) -> dict[str, QuantLinear]:
    """Decoder linear name -> its QuantLinear (one object under several names when shared)."""
    out = {}
    for ref in iter_linears(model):
        q = as_quant(ref.module)
        if q is not None:
            out[ref.name] = q
    return out


def unique_quant_linears(model: nn.Module) -> dict[str, QuantLinear]:
    """Like :func:`quant_linears`, each shared module once (under its first name)."""
    seen: set[int] = set()
    out = {}
    for name, q in quant_linears(model).items():
        if id(q) not in seen:
            seen.add(id(q))
            out[name] = q
    return out


def set_activation_quant(model: nn.Module, cfg: QuantConfig, learnable: bool = False) -> None:
    for m in quant_linears(model).values():
        m.act_quant = ActQuantizer(cfg.a_bits, cfg.a_sym, cfg.a_clip, learnable) if cfg.a_bits < 16 else None


def set_kv_quant(model: nn.Module, cfg: QuantConfig, learnable: bool = False) -> None:
    if cfg.kv_bits < 16:
        install_attention_quant(model, cfg.kv_bits, cfg.kv_bits, cfg.kv_sym, cfg.kv_clip, learnable_clip=learnable)


def quantize_weights_rtn(model: nn.Module, cfg: QuantConfig) -> dict:
    start = time.perf_counter()
    err = 0.0
    for name, m in unique_quant_linears(model).items():  # a shared linear is quantized once
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
    if len(unique_quant_linears(model)) < len(quant_linears(model)):
        return _gptq_shared(model, cfg, calib)
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
                    cfg.act_order, cfg.w_mse, name=n, grid=cfg.w_sym_grid,
                )
                m.set_quantized_weight(q, cfg.w_bits, cfg.w_sym, cfg.group_size, scale=scale, zero=zero)
                block_loss += loss
        losses.append(block_loss)
        return {"gptq_loss": block_loss}

    engine = LayerwiseEngine(model, calib, device=cfg.device, batch_size=cfg.batch_size)
    engine.run(callback, propagate="compressed", desc="gptq")
    return {"weight_quantizer": "gptq", "gptq_loss_per_block": losses, "weight_time_s": time.perf_counter() - start}


def _gptq_shared(model: nn.Module, cfg: QuantConfig, calib: torch.Tensor) -> dict:
    """GPTQ for linears shared by several depths (a recursive model): one Hessian per shared
    linear, accumulated over the inputs of every depth that uses it, then each quantized once.

    Propagation is "original": every depth sees the full-precision model's inputs. The
    sequential scheme cannot apply, since a shared linear's Hessian needs its later depths'
    inputs, which would depend on its own quantization."""
    arch = get_arch(model)
    start = time.perf_counter()
    hess: dict[int, Hessian] = {}

    def callback(ctx):
        mods = {}
        for ref in block_linears(ctx.block, ctx.index, arch, model.config, prefix=f"{ctx.name}."):
            q = as_quant(ref.module)
            if q is not None:
                mods[ref.name] = q

        def collect(name, module, inp, out):
            h = hess.setdefault(id(module), Hessian(module.in_features, ctx.device))
            h.add(module.prepare_input(inp).detach())

        with ctx.hooks(mods, collect):
            ctx.forward(keep=False)

    engine = LayerwiseEngine(model, calib, device=cfg.device, batch_size=cfg.batch_size)
    engine.run(callback, propagate="original", desc="gptq (shared hessians)")
    losses = {}
    for n, m in unique_quant_linears(model).items():
        h = hess[id(m)].h
        home = m.dequantized_weight().device
        m.to(h.device)
        q, scale, zero, loss = gptq_quantize(
            m.dequantized_weight().detach(), h, cfg.w_bits, cfg.w_sym, cfg.group_size, cfg.block_size, cfg.damp,
            cfg.act_order, cfg.w_mse, name=n, grid=cfg.w_sym_grid,
        )
        m.set_quantized_weight(q, cfg.w_bits, cfg.w_sym, cfg.group_size, scale=scale, zero=zero)
        m.to(home)
        losses[n] = loss
    return {"weight_quantizer": "gptq", "gptq_shared": True, "gptq_loss_per_linear": losses,
            "weight_time_s": time.perf_counter() - start}


def quantize_weights(model: nn.Module, cfg: QuantConfig, calib: torch.Tensor | None) -> dict:
    if cfg.w_bits >= 16:
        return {"weight_quantizer": "none"}
    if cfg.weight_quantizer == "gptq":
        return quantize_weights_gptq(model, cfg, require_calib(calib, "gptq", model))
    return quantize_weights_rtn(model, cfg)


def require_calib(calib, method: str, model: nn.Module | None = None) -> torch.Tensor:
    """``calib`` checked (shape, integer dtype, ids in the vocabulary when ``model`` is given)."""
    from ..core.validate import check_token_ids

    if calib is None:
        raise ValueError(
            f"{method} needs calibration token ids: pass calib=effml.calibration_data(tokenizer, "
            "n_samples=..., seq_len=...) (a [n_samples, seq_len] LongTensor)"
        )
    return check_token_ids(calib, model, what="calib")
