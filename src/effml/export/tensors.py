"""effml model -> the tensors of a compressed-tensors checkpoint, named as the HF family names them."""

from __future__ import annotations

import logging

import torch
import torch.nn as nn

from ..core.surgery import iter_linears
from ..quant.quantizers import unpack_codes
from .packing import pack_int32
from .schemes import Scheme, UnsupportedScheme, linear_scheme
from .transforms import TransformGroup, transform_groups, transform_tensors

log = logging.getLogger(__name__)


def check_ready(model: nn.Module, kv_cache: str | None) -> list[str]:
    """Refuse states that cannot be exported; returns notes for the export report."""
    from ..quant.act import ActQuantizer
    from ..quant.kv import AttentionQuant
    from ..quant.qlinear import QuantLinear
    from ..recursive.lora import DepthLoRALinear

    notes = []
    kv_bits = set()
    qk_transform = False
    for name, m in model.named_modules():
        if isinstance(m, ActQuantizer) and m.ste:
            raise ValueError(f"{name} is still calibrating (straight-through rounding on): export after the "
                             "quantization method has returned")
        if isinstance(m, AttentionQuant):
            if m.trainable_qk is not None:
                raise ValueError(f"{name} is still calibrating (trainable Q/K transform): export after the "
                                 "quantization method has returned")
            kv_bits.update(b for b in (m.k_quant.bits, m.v_quant.bits) if b < 16)
            if m.k_transform is not None:
                qk_transform = True
        if isinstance(m, DepthLoRALinear):
            raise UnsupportedScheme(
                f"{name} is a per-depth LoRA of a recursive model: compressed-tensors has no form for it. Export "
                "with format='hf-unrolled' (each depth gets its merged weights), then quantize / export that")
        if isinstance(m, QuantLinear) and m.weight is not None and m.w_bits < 16:
            raise ValueError(f"{name} holds a float weight with w_bits={m.w_bits}: it is still calibrating")
    if qk_transform:
        # queries carry P^-T, keys P: q P^-T (k P)^T = q k^T for any invertible P (FlatQuant's P_h =
        # U diag(s) V^T is not orthogonal), so with a float KV cache the transform changes nothing
        notes.append("post-RoPE Q/K transforms left out (exact: queries carry P^-T and keys P, which cancel in "
                     "q k^T for any invertible P; they only served KV-cache quantization)")
    if getattr(model, "effml_recursive", None) is not None:
        raise UnsupportedScheme("the model is recursive (layers share weights): export with format='hf-unrolled'")
    if kv_bits:
        if kv_cache != "drop":
            raise UnsupportedScheme(
                f"the model quantizes its KV cache to {sorted(kv_bits)} bits; compressed-tensors has no integer KV "
                "cache (fp8 only). Pass kv_cache='drop' (CLI: --kv-cache drop) to export with a float KV cache")
        notes.append(f"KV-cache quantization ({sorted(kv_bits)} bits) dropped: the export has a float KV cache")
    elif kv_cache not in (None, "drop"):
        raise ValueError(f"kv_cache must be None or 'drop', got {kv_cache!r}")
    return notes


def _linear_tensors(name: str, m: nn.Module, scheme: Scheme, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    codes = unpack_codes(m.qweight.cpu(), m.w_bits, (m.out_features, m.in_features))
    scales = m.scales.cpu()
    out = {f"{name}.weight_scale": scales.to(dtype).contiguous()}  # fp16 values: exact in fp32 / fp16
    if scheme.format == "int-quantized":
        out[f"{name}.weight"] = (codes.to(torch.int16) - 128).to(torch.int8)
    else:
        out[f"{name}.weight_packed"] = pack_int32(codes, m.w_bits)
        out[f"{name}.weight_shape"] = torch.tensor([m.out_features, m.in_features], dtype=torch.int64)
        if not m.w_sym:  # effml's unsigned zero point is the format's signed one offset by 2^(b-1)
            out[f"{name}.weight_zero_point"] = pack_int32(m.zeros.cpu(), m.w_bits, dim=0)
    if m.bias is not None:
        out[f"{name}.bias"] = m.bias.detach().cpu().to(dtype)
    return out


def export_tensors(model: nn.Module, dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], dict[str, Scheme], list[str],
                                                                list[TransformGroup]]:
    """(tensors, scheme per quantized linear, names of every decoder linear, online transforms).

    Floating-point tensors are cast to ``dtype``; effml-only modules (KV quantizers) are left out;
    tied embeddings are written once, as HF's ``save_pretrained`` does. The online input
    transform of a linear left in floating point is folded into its weight (``W Tᵀ``, exact);
    those of quantized linears go out as ``transform_config`` groups with their matrices.
    """
    from ..quant.qlinear import QuantLinear

    linears = [ref.name for ref in iter_linears(model)]
    schemes: dict[str, Scheme] = {}
    special: dict[str, nn.Module] = {}
    for name in linears:
        m = model.get_submodule(name)
        if isinstance(m, QuantLinear):
            s = linear_scheme(name, m)
            special[name] = m
            if s is not None:
                schemes[name] = s
    tensors: dict[str, torch.Tensor] = {}
    for key, t in model.state_dict().items():
        parts = key.split(".")
        # a quantized linear's own tensors and those of its children (input transform, activation
        # quantizer) are written below in the format's form
        if any(".".join(parts[:i]) in special for i in range(1, len(parts))) or ".effml_kv." in f".{key}" \
                or key.startswith("effml_kv."):
            continue
        tensors[key] = t.detach().cpu().to(dtype) if t.is_floating_point() else t.detach().cpu()
    for name, m in special.items():
        if name in schemes:
            tensors.update(_linear_tensors(name, m, schemes[name], dtype))
        else:
            w = m.dequantized_weight().detach().cpu()
            if m.input_transform is not None:  # x T Wᵀ = x (W Tᵀ)ᵀ: no online transform needed
                w = w.double() @ m.input_transform.dense().cpu().T
            tensors[f"{name}.weight"] = w.to(dtype)
            if m.bias is not None:
                tensors[f"{name}.bias"] = m.bias.detach().cpu().to(dtype)
    groups = transform_groups(model, [n for n in linears if n in schemes])
    tensors.update(transform_tensors(groups, dtype))
    if getattr(model.config, "tie_word_embeddings", False):
        tensors.pop("lm_head.weight", None)
    return {k: v.contiguous() for k, v in tensors.items()}, schemes, linears, groups


def was_pruned(model: nn.Module) -> bool:
    """Pruned by effml (its report keeps a ``prune`` entry across later steps). Counting zeros
    would not tell: 4-bit rounding alone sets a good share of weights to exactly 0."""
    rep = getattr(model, "effml_report", None)
    return isinstance(rep, dict) and ("prune" in rep or any(s.get("step") == "prune" for s in rep.get("steps", [])))


def sparsity_config(model: nn.Module, linears: list[str]) -> dict | None:
    """Dense-format ``sparsity_config`` with the measured global sparsity of the decoder linears
    of a pruned model (None for a model effml did not prune)."""
    if not was_pruned(model):
        return None
    zeros = total = 0
    two_four = True
    for name in linears:
        m = model.get_submodule(name)
        w = m.dequantized_weight() if hasattr(m, "dequantized_weight") else m.weight
        w = w.detach()
        zeros += int((w == 0).sum())
        total += w.numel()
        if two_four:
            two_four = w.shape[1] % 4 == 0 and bool(((w.reshape(w.shape[0], -1, 4) == 0).sum(-1) >= 2).all())
    sparsity = zeros / max(total, 1)
    return {"format": "dense", "global_sparsity": round(sparsity, 6), "sparsity_structure": "2:4" if two_four else
            "unstructured", "targets": ["Linear"], "ignore": ["lm_head"]}
