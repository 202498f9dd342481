"""Conversion exactness on tiny random models of every registered family."""

import pytest
import torch
from recursive_helpers import copy_of, rel_err, tiny_with_biases

from effml.core.arch import get_arch, get_submodule
from effml.recursive import DepthLoRALinear, recursify, share_groups
from effml.testing import FAMILIES, random_ids

# every norm feeds a projection, so tied norms can be folded into the LoRA residual
ALL_NORMS_FOLDABLE = ("llama", "mistral", "qwen2", "phi3")
# q/k norms (qwen3, gemma3) and Gemma's output norms act after a projection: not foldable
HAS_UNFOLDABLE = ("qwen3", "gemma2", "gemma3_text")


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("init", ["average", "stepwise"])
def test_full_rank_untied_norms_reproduces_original(family, init):
    model = tiny_with_biases(family)
    ids = random_ids(model)
    ref = logits(model, ids)
    rec = recursify(copy_of(model), num_loops=2, init=init, lora_rank="full", tie_norms=False)
    assert rel_err(logits(rec, ids), ref) < 1e-4


@pytest.mark.parametrize("family", ALL_NORMS_FOLDABLE)
def test_full_rank_tied_norms_reproduces_original(family):
    model = tiny_with_biases(family)
    ids = random_ids(model)
    ref = logits(model, ids)
    rec = recursify(copy_of(model), num_loops=2, init="average", lora_rank="full", tie_norms=True)
    # norms really are shared between the depths of a group
    layers = get_submodule(rec, get_arch(rec).layers)
    assert layers[0].input_layernorm.weight is layers[2].input_layernorm.weight
    assert rel_err(logits(rec, ids), ref) < 1e-4


@pytest.mark.parametrize("family", HAS_UNFOLDABLE)
def test_foldable_tying_is_exact_and_full_tying_is_not(family):
    model = tiny_with_biases(family)
    ids = random_ids(model)
    ref = logits(model, ids)
    rec = recursify(copy_of(model), num_loops=2, init="average", lora_rank="full", tie_norms="foldable")
    assert rel_err(logits(rec, ids), ref) < 1e-4
    # tying the post-projection norms too cannot be undone by a LoRA on the projections
    rec_all = recursify(copy_of(model), num_loops=2, init="average", lora_rank="full", tie_norms=True)
    assert rel_err(logits(rec_all, ids), ref) > 1e-3


def pure_recursive_reference(model, groups, sources):
    """Plain-torch reference: every depth of a group gets the mean of its source layers' weights."""
    ref = copy_of(model)
    layers = get_submodule(ref, get_arch(ref).layers)
    states = [{k: v.clone() for k, v in layer.state_dict().items()} for layer in layers]
    with torch.no_grad():
        for g, src in zip(groups, sources):
            value = {k: torch.stack([states[s][k] for s in src]).mean(0) for k in states[0]}
            for d in g:
                layers[d].load_state_dict(value)
    return ref


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("strategy", ["cycle", "sequence"])
def test_rank0_equals_pure_recursive(family, strategy):
    model = tiny_with_biases(family)
    ids = random_ids(model)
    groups = share_groups(model.config.num_hidden_layers, 2, strategy)
    ref = logits(pure_recursive_reference(model, groups, groups), ids)
    rec = recursify(copy_of(model), num_loops=2, strategy=strategy, init="average", lora_rank=0)
    assert not any(isinstance(m, DepthLoRALinear) for m in rec.modules())
    assert rel_err(logits(rec, ids), ref) < 1e-6
    # a LoRA with the standard init (B = 0) does not change the pure recursive model
    zero = recursify(copy_of(model), num_loops=2, strategy=strategy, init="average", lora_rank=4, lora_init="zero")
    assert torch.equal(logits(zero, ids), logits(rec, ids))


@pytest.mark.parametrize("init,sources", [("lower", [[0], [1]]), ("stepwise", [[0], [3]])])
def test_lower_and_stepwise_init_reference(init, sources):
    model = tiny_with_biases("llama")
    ids = random_ids(model)
    groups = share_groups(4, 2, "cycle")
    ref = logits(pure_recursive_reference(model, groups, sources), ids)
    rec = recursify(copy_of(model), num_loops=2, init=init)
    assert rec.effml_report["recursify"]["init_layers"] == sources
    assert torch.allclose(logits(rec, ids), ref, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_one_loop_is_identity(family):
    model = tiny_with_biases(family)
    ids = random_ids(model)
    ref = logits(model, ids)
    assert torch.equal(logits(recursify(copy_of(model), num_loops=1), ids), ref)
    # zero residuals fall back to the standard LoRA init, which leaves the output unchanged
    rec = recursify(copy_of(model), num_loops=1, lora_rank=8)
    assert rec.effml_report["recursify"]["lora_inits"] == {"standard": 4 * 7}
    assert torch.allclose(logits(rec, ids), ref, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_parameters_are_shared_by_object_and_depth_modules_kept(family):
    model = tiny_with_biases(family)
    arch = get_arch(model)
    orig_layers = list(get_submodule(model, arch.layers))
    attn_types = [getattr(layer, "attention_type", None) for layer in orig_layers]
    rec = recursify(model, num_loops=2, strategy="cycle", init="average", lora_rank=4)
    layers = get_submodule(rec, arch.layers)
    assert rec.config.num_hidden_layers == 4 and len(layers) == 4
    assert [layer.self_attn.layer_idx for layer in layers] == [0, 1, 2, 3]
    assert [getattr(layer, "attention_type", None) for layer in layers] == attn_types
    assert len({id(layer) for layer in layers}) == 4
    for a, b in ((0, 2), (1, 3)):
        for (n, p), (_, q) in zip(layers[a].named_parameters(), layers[b].named_parameters()):
            if "lora_" in n:
                assert p is not q, n
            else:
                assert p is q, n


def test_shared_weight_gets_gradient_from_every_depth():
    model = tiny_with_biases("llama")
    rec = recursify(model, num_loops=2, init="average", lora_rank=2)
    shared = rec.model.layers[0].mlp.down_proj.weight
    # the gradient of the shared weight is the sum of what each depth would get alone
    ids = random_ids(rec, 1, 8)
    rec.zero_grad()
    rec(input_ids=ids).logits.square().mean().backward()
    both = shared.grad.clone()
    grads = []
    for depth in (0, 2):
        other = 2 - depth
        rec.zero_grad()
        mod = rec.model.layers[other].mlp.down_proj
        mod.weight = torch.nn.Parameter(shared.detach().clone())  # cut the tie at the other depth
        rec(input_ids=ids).logits.square().mean().backward()
        grads.append(shared.grad.clone())
        mod.weight = shared
    assert torch.allclose(both, grads[0] + grads[1], atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_with_cache_equals_no_cache(family):
    model = tiny_with_biases(family)
    rec = recursify(model, num_loops=2, init="average", lora_rank=4)
    with torch.no_grad():
        for p in rec.parameters():  # move LoRA B away from zero so every depth differs
            p.add_(torch.randn_like(p) * 1e-2)
    ids = random_ids(rec, 1, 6)
    out = rec.generate(ids, max_new_tokens=10, do_sample=False, use_cache=True, pad_token_id=0)
    seq = ids
    for _ in range(10):  # greedy decoding by full forwards without any cache
        nxt = logits(rec, seq)[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], dim=1)
    assert torch.equal(out, seq)
    # every depth has its own cache entry: loop 2 never writes over loop 1
    with torch.no_grad():
        cache = rec(input_ids=ids, use_cache=True).past_key_values
    keys = [layer.keys for layer in cache.layers]
    assert len(keys) == 4 and not torch.allclose(keys[0], keys[2])


def test_gradient_checkpointing_and_to():
    model = tiny_with_biases("llama")
    rec = recursify(model, num_loops=2, init="average", lora_rank=4).to(torch.float64)
    assert rec.model.layers[0].self_attn.q_proj.weight is rec.model.layers[2].self_attn.q_proj.weight
    assert rec.model.layers[0].self_attn.q_proj.lora_A["q"].dtype == torch.float64
    rec.train()
    rec.gradient_checkpointing_enable()
    ids = random_ids(rec, 1, 8)
    rec(input_ids=ids, labels=ids).loss.backward()
    g1 = rec.model.layers[0].self_attn.q_proj.weight.grad.clone()
    rec.gradient_checkpointing_disable()
    rec.zero_grad()
    rec(input_ids=ids, labels=ids).loss.backward()
    assert torch.allclose(rec.model.layers[0].self_attn.q_proj.weight.grad, g1, atol=1e-10)
