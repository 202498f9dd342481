"""Tiny random-weight models of every registered family, for tests and examples."""

from __future__ import annotations

import torch

# Small but not degenerate: GQA (4 heads over 2 KV heads), several layers, odd-ish sizes, and a
# Gemma sliding window shorter than the test sequences so sliding and global layers differ.
_COMMON = dict(
    vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, max_position_embeddings=256, rms_norm_eps=1e-6,
    tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0,
)


def _config(family: str, **overrides):
    from transformers import (
        Gemma2Config,
        Gemma3TextConfig,
        LlamaConfig,
        MistralConfig,
        Phi3Config,
        Qwen2Config,
        Qwen3Config,
    )

    kw = dict(_COMMON)
    if family == "llama":
        cls = LlamaConfig
    elif family == "mistral":
        cls, kw = MistralConfig, {**kw, "sliding_window": None}
    elif family == "qwen2":
        cls = Qwen2Config
    elif family == "qwen3":
        cls = Qwen3Config
    elif family == "gemma2":
        cls, kw = Gemma2Config, {**kw, "sliding_window": 8, "query_pre_attn_scalar": 16,
                                 "final_logit_softcapping": 30.0, "attn_logit_softcapping": 50.0}
    elif family == "gemma3_text":
        cls, kw = Gemma3TextConfig, {**kw, "sliding_window": 8, "query_pre_attn_scalar": 16,
                                     "layer_types": ["sliding_attention", "full_attention"] * 2}
    elif family == "phi3":
        cls = Phi3Config
        kw.pop("head_dim")
    else:
        raise ValueError(f"no tiny config for {family!r}")
    kw.update(overrides)
    return cls(**kw)


FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3")


def tiny_model(family: str = "llama", seed: int = 0, **overrides):
    """A randomly initialised causal LM of ``family`` in float32, eval mode, eager attention.

    Norm weights are randomised too, so tests that fold or tie norms cannot pass by accident.
    """
    from transformers import AutoModelForCausalLM

    config = _config(family, **overrides)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.rand_like(p) * 0.5 + 0.75 - (1.0 if "gemma" in family else 0.0))
    return model.eval()


def random_ids(model, n: int = 2, seq_len: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, model.config.vocab_size, (n, seq_len), generator=g)
