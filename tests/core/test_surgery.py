import torch
import torch.nn as nn

from effml.core.surgery import embeddings_tied, iter_linears, replace_linears, untie_embeddings
from effml.testing import random_ids, tiny_model


def test_iter_linears_filters_by_role_and_block():
    model = tiny_model("llama")
    assert len(list(iter_linears(model))) == 4 * 7
    downs = list(iter_linears(model, roles=["down"]))
    assert [r.block for r in downs] == [0, 1, 2, 3]
    assert all(r.name.endswith("mlp.down_proj") for r in downs)
    assert len(list(iter_linears(model, blocks=[2]))) == 7
    assert len(list(iter_linears(tiny_model("phi3")))) == 4 * 4  # fused modules yielded once


def test_replace_linears_keeps_outputs_when_equivalent():
    model = tiny_model("qwen2")
    ids = random_ids(model)
    ref = model(input_ids=ids).logits

    class Wrapped(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x)

    names = replace_linears(model, lambda r: Wrapped(r.module), roles=["q", "down"])
    assert len(names) == 8
    assert isinstance(model.model.layers[1].self_attn.q_proj, Wrapped)
    assert isinstance(model.model.layers[1].self_attn.k_proj, nn.Linear)
    torch.testing.assert_close(model(input_ids=ids).logits, ref, rtol=0, atol=0)


def test_untie_embeddings():
    model = tiny_model("llama", tie_word_embeddings=True)
    ids = random_ids(model)
    ref = model(input_ids=ids).logits
    assert embeddings_tied(model)
    assert untie_embeddings(model)
    assert not embeddings_tied(model) and not model.config.tie_word_embeddings
    torch.testing.assert_close(model(input_ids=ids).logits, ref, rtol=0, atol=0)
    with torch.no_grad():
        model.lm_head.weight.mul_(2)  # changing the head no longer touches the embeddings
    assert not torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)
    assert not untie_embeddings(model)
