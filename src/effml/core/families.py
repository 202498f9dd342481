"""The registered model families. Each entry is the whole of what effml needs to know."""

from __future__ import annotations

from .arch import ArchSpec, Fused, NormSpec, register_arch

_SPLIT_LINEARS = {
    "q": "self_attn.q_proj",
    "k": "self_attn.k_proj",
    "v": "self_attn.v_proj",
    "o": "self_attn.o_proj",
    "gate": "mlp.gate_proj",
    "up": "mlp.up_proj",
    "down": "mlp.down_proj",
}
_PRE_NORMS = {
    "input": NormSpec("input_layernorm", feeds=("q", "k", "v")),
    "post_attention": NormSpec("post_attention_layernorm", feeds=("gate", "up")),
}
_QK_NORMS = {
    "q_norm": NormSpec("self_attn.q_norm", per_head=True),
    "k_norm": NormSpec("self_attn.k_norm", per_head=True),
}
# Gemma: a sandwich of norms. post_attention / post_feedforward scale block outputs and feed no
# linear; pre_feedforward feeds the MLP.
_GEMMA_NORMS = {
    "input": NormSpec("input_layernorm", feeds=("q", "k", "v")),
    "post_attention": NormSpec("post_attention_layernorm"),
    "pre_feedforward": NormSpec("pre_feedforward_layernorm", feeds=("gate", "up")),
    "post_feedforward": NormSpec("post_feedforward_layernorm"),
}

LLAMA = register_arch(ArchSpec("llama", linears=_SPLIT_LINEARS, norms=_PRE_NORMS))
MISTRAL = register_arch(ArchSpec("mistral", linears=_SPLIT_LINEARS, norms=_PRE_NORMS))
QWEN2 = register_arch(ArchSpec("qwen2", linears=_SPLIT_LINEARS, norms=_PRE_NORMS))
QWEN3 = register_arch(ArchSpec("qwen3", linears=_SPLIT_LINEARS, norms={**_PRE_NORMS, **_QK_NORMS}))
GEMMA2 = register_arch(ArchSpec("gemma2", linears=_SPLIT_LINEARS, norms=_GEMMA_NORMS, norm_offset=1.0))
GEMMA3_TEXT = register_arch(
    ArchSpec("gemma3_text", linears=_SPLIT_LINEARS, norms={**_GEMMA_NORMS, **_QK_NORMS}, norm_offset=1.0)
)
PHI3 = register_arch(
    ArchSpec(
        "phi3",
        linears={
            "q": "self_attn.qkv_proj",
            "k": "self_attn.qkv_proj",
            "v": "self_attn.qkv_proj",
            "o": "self_attn.o_proj",
            "gate": "mlp.gate_up_proj",
            "up": "mlp.gate_up_proj",
            "down": "mlp.down_proj",
        },
        norms=_PRE_NORMS,
        fused={
            "self_attn.qkv_proj": Fused(("q", "k", "v"), ("q", "kv", "kv")),
            "mlp.gate_up_proj": Fused(("gate", "up"), ("inter", "inter")),
        },
    )
)
