"""KV-cache quantization (and online Q/K transforms) by module attachment, not global patching.

Each attention module gets a child ``effml_kv`` (:class:`AttentionQuant`) and its own copy of
the config whose ``_attn_implementation`` names :data:`ATTN_NAME`, an attention function
registered through transformers' ``AttentionInterface`` (its extension point). That function
transforms / quantizes the post-RoPE queries, keys and values the attention module hands it,
then calls the implementation the model used before (eager of the module's own family, sdpa,
...), so masks, sliding windows and soft-capping stay the family's own.
"""

from __future__ import annotations

import copy
import sys

import torch
import torch.nn as nn

from ..core.arch import get_arch
from ..core.io import register_model_transform, register_module_type
from .act import ActQuantizer

ATTN_NAME = "effml_quant"
_INNER = "effml_inner_attn_implementation"
CHILD = "effml_kv"


@register_module_type
class AttentionQuant(nn.Module):
    """Post-RoPE hooks of one attention layer.

    ``qk_transform`` P (optional, head_dim x head_dim): keys become ``k P`` and queries
    ``q P^{-T}`` so ``q kᵀ`` is unchanged (orthogonal P: both ``@ P``). Keys and values are then
    quantized per (token, head), asymmetric by default (``k_quant``, ``v_quant``).
    """

    def __init__(self, head_dim: int, k_bits: int = 16, v_bits: int = 16, sym: bool = False, clip: float = 1.0,
                 learnable_clip: bool = False, has_qk_transform: bool = False):
        super().__init__()
        self.head_dim = head_dim
        self.k_quant = ActQuantizer(k_bits, sym, clip, learnable_clip)
        self.v_quant = ActQuantizer(v_bits, sym, clip, learnable_clip)
        if has_qk_transform:
            self.k_transform = nn.Parameter(torch.eye(head_dim), requires_grad=False)
            self.q_transform = nn.Parameter(torch.eye(head_dim), requires_grad=False)
        else:
            self.k_transform = self.q_transform = None
        self.trainable_qk: nn.Module | None = None  # FlatQuant's P_h while it calibrates

    def set_qk_transform(self, p: torch.Tensor) -> None:
        with torch.no_grad():
            self.k_transform = nn.Parameter(p.float().clone(), requires_grad=False)
            self.q_transform = nn.Parameter(torch.linalg.inv(p.double()).T.float(), requires_grad=False)
        self.trainable_qk = None

    def forward(self, q, k, v):
        if self.trainable_qk is not None:
            k = k @ self.trainable_qk.matrix()
            q = q @ self.trainable_qk.inv_t()
        elif self.k_transform is not None:
            k = k @ self.k_transform.to(k.dtype)
            q = q @ self.q_transform.to(q.dtype)
        return q, self.k_quant(k), self.v_quant(v)

    def effml_spec(self) -> dict:
        return {"head_dim": self.head_dim, "k_bits": self.k_quant.bits, "v_bits": self.v_quant.bits,
                "sym": self.k_quant.sym, "clip": self.k_quant.clip, "learnable_clip": self.k_quant.learnable,
                "has_qk_transform": self.k_transform is not None}

    @classmethod
    def effml_build(cls, spec: dict) -> AttentionQuant:
        return cls(**spec)


def _inner_attention(module: nn.Module):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    name = getattr(module.config, _INNER)
    if name in (None, "eager"):
        return sys.modules[type(module).__module__].eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[name]


def quantized_attention(module, query, key, value, attention_mask, **kwargs):
    hooks = getattr(module, CHILD, None)
    if hooks is not None:
        query, key, value = hooks(query, key, value)
    return _inner_attention(module)(module, query, key, value, attention_mask, **kwargs)


def _register():
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_NAME, quantized_attention)


_register()


def attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(path, module) of each block's attention module: the parent of the q projection."""
    arch = get_arch(model)
    layers = model.get_submodule(arch.layers)
    parent = arch.linears["q"].rpartition(".")[0]
    return [(f"{arch.layers}.{i}.{parent}", layer.get_submodule(parent)) for i, layer in enumerate(layers)]


@register_model_transform("effml.quant.attention")
def route_attention(model: nn.Module, attn_implementation: str | None = None) -> nn.Module:
    """Send every attention layer through :func:`quantized_attention` (idempotent). On load this
    restores the attention implementation the model was quantized with (eager and sdpa round
    differently, which 4-bit rounding can amplify) and gives each attention an (identity)
    ``effml_kv`` child, which the saved one replaces."""
    if attn_implementation is not None and model.config._attn_implementation != attn_implementation:
        model.set_attn_implementation(attn_implementation)
    head_dim = get_arch(model).heads(model.config).head_dim
    for _, attn in attention_modules(model):
        if getattr(attn, CHILD, None) is None:
            setattr(attn, CHILD, AttentionQuant(head_dim))
        if attn.config._attn_implementation == ATTN_NAME:
            continue
        cfg = copy.copy(attn.config)  # shallow: only this module's dispatch changes
        setattr(cfg, _INNER, attn.config._attn_implementation)
        cfg._attn_implementation = ATTN_NAME
        attn.config = cfg
    return model


def install_attention_quant(model: nn.Module, k_bits: int, v_bits: int, sym: bool = False, clip: float = 1.0,
                            learnable_clip: bool = False) -> list[AttentionQuant]:
    """Attach an :class:`AttentionQuant` to every attention layer and route attention through it."""
    from ..core.io import record_transform

    head_dim = get_arch(model).heads(model.config).head_dim
    out = []
    for _, attn in attention_modules(model):
        hooks = getattr(attn, CHILD, None)
        if hooks is None:
            hooks = AttentionQuant(head_dim, k_bits, v_bits, sym, clip, learnable_clip)
            # buffers too: an attention whose linears are all packed QuantLinears has no parameters
            src = next(iter(attn.parameters()), None)
            src = next(iter(attn.buffers()), None) if src is None else src
            setattr(attn, CHILD, hooks if src is None else hooks.to(src.device))
        else:
            hooks.k_quant = ActQuantizer(k_bits, sym, clip, learnable_clip)
            hooks.v_quant = ActQuantizer(v_bits, sym, clip, learnable_clip)
        out.append(hooks)
    if not any(t["type"] == "effml.quant.attention" for t in model.__dict__.get("effml_transforms", [])):
        impl = model.config._attn_implementation
        route_attention(model)
        record_transform(model, "effml.quant.attention", attn_implementation=impl)
    return out
