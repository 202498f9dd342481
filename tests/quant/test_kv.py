import pytest
import torch

from effml.quant.kv import attention_modules, install_attention_quant
from effml.quant.quantizers import fake_quant_rows
from effml.testing import FAMILIES, random_ids, tiny_model


@pytest.mark.parametrize("family", FAMILIES)
def test_sixteen_bit_kv_and_orthogonal_qk_transform_keep_logits(family):
    model = tiny_model(family)
    ids = random_ids(model)
    ref = model(ids).logits
    hooks = install_attention_quant(model, 16, 16)
    assert torch.equal(model(ids).logits, ref)
    g = torch.Generator().manual_seed(0)
    for h in hooks:
        h.set_qk_transform(torch.linalg.qr(torch.randn(16, 16, generator=g))[0])
    torch.testing.assert_close(model(ids).logits, ref, rtol=0, atol=1e-4)


def test_kv_quant_matches_manual_attention():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

    model = tiny_model("llama", num_hidden_layers=1)
    ids = random_ids(model, 1, 12)
    install_attention_quant(model, 4, 3)
    attn = model.model.layers[0].self_attn
    seen = {}
    pre = attn.register_forward_pre_hook(lambda m, a, kw: seen.update(x=kw["hidden_states"], kw=kw), with_kwargs=True)
    post = attn.register_forward_hook(lambda m, a, out: seen.update(out=out[0]))
    model(ids)
    pre.remove(), post.remove()

    # plain-torch attention with K/V quantized per (token, head), asymmetric
    x, (cos, sin) = seen["x"], seen["kw"]["position_embeddings"]
    b, s, d = 1, 12, 16
    q = attn.q_proj(x).view(b, s, -1, d).transpose(1, 2)
    k = attn.k_proj(x).view(b, s, -1, d).transpose(1, 2)
    v = attn.v_proj(x).view(b, s, -1, d).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    k, v = fake_quant_rows(k, 4, False), fake_quant_rows(v, 3, False)
    k, v = repeat_kv(k, 2), repeat_kv(v, 2)
    scores = q @ k.transpose(2, 3) / d**0.5
    scores = scores.masked_fill(torch.triu(torch.ones(s, s, dtype=torch.bool), 1), float("-inf"))
    ref = attn.o_proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(b, s, -1))
    torch.testing.assert_close(seen["out"], ref, rtol=0, atol=1e-5)
    assert len(attention_modules(model)) == 1
