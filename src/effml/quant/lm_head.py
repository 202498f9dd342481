"""Weight-only quantization of the LM head (``quantize(..., lm_head_bits=8)`` or 4).

On a small model the head is a large share of the bytes read per decoded token (SmolLM2-135M:
113 MB in float32, 21% of them, and two thirds once the decoder linears are 4-bit). Tied
embeddings are untied first: the input embedding stays in floating point (a lookup reads one
row per token, so quantizing it saves memory but no time).
"""

from __future__ import annotations

import logging

import torch.nn as nn

from ..core.arch import get_arch, get_submodule
from ..core.surgery import set_submodule, untie_embeddings
from .qlinear import QuantLinear
from .quantizers import check_bits

log = logging.getLogger(__name__)


def quantize_lm_head(model: nn.Module, bits: int, group_size: int | None = None, sym: bool = True) -> dict:
    """Replace the LM head by a weight-only ``bits``-bit QuantLinear (RTN, per channel or per
    group); returns the report entries. ``group_size`` must divide the hidden size."""
    check_bits(bits, "lm_head_bits", allow_16=False)
    arch = get_arch(model)
    head = get_submodule(model, arch.lm_head)
    if isinstance(head, QuantLinear):
        raise ValueError(f"{arch.lm_head} is already a QuantLinear ({head.w_bits}-bit): quantize the head once")
    if not isinstance(head, nn.Linear):
        raise ValueError(f"{arch.lm_head} is a {type(head).__name__}, not nn.Linear: cannot quantize it")
    if group_size is not None and head.in_features % group_size:
        raise ValueError(f"group_size={group_size} does not divide the LM head's input size {head.in_features}: "
                         "use a divisor of it or None (per channel)")
    untied = untie_embeddings(model)
    float_bytes = head.weight.numel() * head.weight.element_size()
    q = QuantLinear.from_linear(head)
    q.set_quantized_weight(head.weight.detach(), bits, sym, group_size)
    set_submodule(model, arch.lm_head, q)
    _, stored = q.effml_storage()
    log.info("LM head quantized to %d bits (%.1f MB -> %.1f MB%s)", bits, float_bytes / 2**20, stored / 2**20,
             ", untied from the embeddings" if untied else "")
    return {"lm_head": {"bits": bits, "group_size": group_size, "sym": sym, "untied_embeddings": untied,
                        "float_bytes": float_bytes, "stored_bytes": stored,
                        "bits_per_weight": round(8 * stored / head.weight.numel(), 3)}}


def lm_head_step(model: nn.Module, cfg) -> dict:
    """``effml.quantize``'s LM-head step from a QuantConfig (nothing when ``lm_head_bits`` is 16).
    5..8 bits: per channel (what the CPU int8 kernel takes); 2..4 bits: the decoder's group
    size when it divides the hidden size, else per channel."""
    if cfg.lm_head_bits >= 16:
        return {}
    head = get_submodule(model, get_arch(model).lm_head)
    g = cfg.group_size if cfg.lm_head_bits <= 4 else None
    if g is not None and getattr(head, "in_features", 0) % g:
        g = None
    return quantize_lm_head(model, cfg.lm_head_bits, g, sym=True)
