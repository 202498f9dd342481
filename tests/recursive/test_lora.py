"""The per-depth LoRA module, rank handling and the parameter report."""

import pytest
import torch
import torch.nn as nn

from effml.recursive import DepthLoRALinear, recursify, truncate_ranks
from effml.testing import random_ids, tiny_model


def test_svd_init_is_truncated_svd_at_scale_one():
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(12, 10))
    residual = torch.randn(12, 10)
    m = DepthLoRALinear(w, None, {"q": (0, 12)}, {"q": 3})
    kind, kept = m.init_from_residual("q", residual, None, torch.Generator().manual_seed(0))
    assert kind == "svd"
    u, s, vh = torch.linalg.svd(residual)
    best = (u[:, :3] * s[:3]) @ vh[:3]  # Eckart-Young: the best rank-3 approximation
    assert kept == pytest.approx(1 - ((residual - best).norm() / residual.norm()).item(), abs=1e-5)
    assert torch.allclose(m.lora_B["q"] @ m.lora_A["q"], best, atol=1e-5)
    x = torch.randn(5, 10)
    assert torch.allclose(m(x), x @ (w + best).T, atol=1e-5)


def test_zero_residual_falls_back_to_standard_init():
    w = nn.Parameter(torch.randn(6, 8))
    m = DepthLoRALinear(w, None, {"o": (0, 6)}, {"o": 2})
    assert m.init_from_residual("o", torch.zeros(6, 8), None, torch.Generator().manual_seed(0)) == ("standard", 1.0)
    assert torch.count_nonzero(m.lora_B["o"]) == 0 and torch.count_nonzero(m.lora_A["o"]) > 0


def test_fused_roles_write_only_their_rows():
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(10, 4))
    b = nn.Parameter(torch.randn(10))
    m = DepthLoRALinear(w, b, {"q": (0, 4), "k": (4, 7), "v": (7, 10)}, {"k": 2}, bias_delta=("k",))
    with torch.no_grad():
        m.lora_A["k"].normal_()
        m.lora_B["k"].normal_()
        m.lora_bias["k"].normal_()
    x = torch.randn(3, 4)
    expect = x @ w.T + b
    expect[:, 4:7] += x @ m.lora_A["k"].T @ m.lora_B["k"].T + m.lora_bias["k"]
    assert torch.allclose(m(x), expect, atol=1e-6)


def test_lora_parameter_count_matches_formula():
    model = tiny_model("llama")
    c = model.config
    rank = 8
    rec = recursify(model, num_loops=2, init="average", lora_rank=rank, tie_norms=True)
    rep = rec.effml_report["recursify"]
    h, i, kv = c.hidden_size, c.intermediate_size, c.num_key_value_heads * c.head_dim
    q = c.num_attention_heads * c.head_dim
    shapes = [(q, h), (kv, h), (kv, h), (h, q), (i, h), (i, h), (h, i)]  # (out, in) of q k v o gate up down
    per_depth = sum(min(rank, o, n) * (o + n) for o, n in shapes)
    assert rep["after"]["lora"] == c.num_hidden_layers * per_depth
    block = sum(o * n for o, n in shapes) + 2 * h  # two norms
    assert rep["before"]["blocks"] == c.num_hidden_layers * block
    assert rep["after"]["blocks"] == (c.num_hidden_layers // 2) * block
    assert rep["after"]["embeddings"] == rep["before"]["embeddings"] == 2 * c.vocab_size * h
    assert rep["after"]["non_embedding"] == rep["after"]["blocks"] + rep["after"]["lora"] + h
    assert rep["rank_caps"] == []


def test_rank_above_dimensions_is_capped_and_reported():
    rec = recursify(tiny_model("llama"), num_loops=2, lora_rank=50)
    caps = rec.effml_report["recursify"]["rank_caps"]
    assert any(c.startswith("k: rank 50 > min(in=64, out=32), using 32") for c in caps)
    assert rec.model.layers[0].self_attn.k_proj.ranks == {"k": 32}
    assert rec.model.layers[0].mlp.down_proj.ranks == {"down": 50}


def test_rank_per_target_dict():
    rec = recursify(tiny_model("phi3"), num_loops=2, lora_rank={"k": 4, "down": "full"}, lora_targets=("k", "down"))
    layer = rec.model.layers[1]
    assert layer.self_attn.qkv_proj.ranks == {"k": 4}
    assert layer.mlp.down_proj.ranks == {"down": 64}
    assert isinstance(layer.self_attn.o_proj, nn.Linear)


def test_truncate_equals_converting_at_lower_rank():
    model = tiny_model("qwen2")
    ids = random_ids(model)
    direct = recursify(tiny_model("qwen2"), num_loops=2, init="average", lora_rank=5)
    cut = recursify(model, num_loops=2, init="average", lora_rank=20)
    assert truncate_ranks(cut, 5) > 0
    with torch.no_grad():
        assert torch.allclose(cut(ids).logits, direct(ids).logits, atol=1e-5)
    with pytest.raises(ValueError, match="positive int"):
        truncate_ranks(cut, 0)
