"""``drop_layers``: block influence, the budget, and a dropped model that is still an ordinary
HF model (KV cache, per-layer attention types, generate, save/load)."""

import pytest
import torch
from recursive_helpers import copy_of

import effml
from effml.recursive import block_influence, drop_layers, parameter_report, recursify
from effml.testing import random_ids, tiny_model

SIX = {"num_hidden_layers": 6}
GEMMA_SIX = {"num_hidden_layers": 6, "layer_types": ["sliding_attention", "full_attention"] * 3}


def six_layers(family):
    return tiny_model(family, **(GEMMA_SIX if family == "gemma3_text" else SIX))


def make_identity(model, *layers):
    """Zero the block's attention output and MLP down projection: the block adds nothing to the
    residual stream (Gemma's post-norms of a zero vector are zero too)."""
    with torch.no_grad():
        for i in layers:
            block = model.model.layers[i]
            for lin in (block.self_attn.o_proj, block.mlp.down_proj):
                lin.weight.zero_()
                if lin.bias is not None:
                    lin.bias.zero_()
    return model


def budget_dropping(model, k):
    """A budget that is met by dropping exactly k blocks."""
    total = parameter_report(model)["non_embedding"]
    block = sum(p.numel() for p in model.model.layers[0].parameters())
    return (total - k * block + 1) / total


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3_text", "phi3"])
def test_identity_blocks_are_dropped_first_and_the_model_is_unchanged(family):
    model = make_identity(six_layers(family), 1, 4)
    ids = random_ids(model, 2, 24, seed=3)  # longer than Gemma's sliding window of 8
    ref = logits(model, ids)
    calib = random_ids(model, 4, 24, seed=1)
    influence = block_influence(model, calib)
    assert influence[1] < 1e-6 and influence[4] < 1e-6 and min(influence[i] for i in (0, 2, 3, 5)) > 1e-2
    types = list(getattr(model.config, "layer_types", None) or [])
    budget = budget_dropping(model, 2)
    drop_layers(model, budget, calib)
    rep = model.effml_report["drop_layers"]
    assert rep["dropped"] == [1, 4] and rep["kept"] == [0, 2, 3, 5] == rep["teacher_layers"]
    assert rep["after"]["non_embedding"] <= budget * rep["before"]["non_embedding"]
    assert rep["after"]["non_embedding"] == parameter_report(model)["non_embedding"]
    assert model.config.num_hidden_layers == 4 and len(model.model.layers) == 4
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1, 2, 3]
    if types:
        assert model.config.layer_types == [types[i] for i in (0, 2, 3, 5)]
        assert rep["per_layer_config"] == ["layer_types"]
    assert torch.allclose(logits(model, ids), ref, atol=1e-5)
    assert model.effml_report["steps"][-1]["step"] == "drop_layers"


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_dropped_model_generates_with_its_cache_and_saves(tmp_path, family):
    model = six_layers(family)
    calib = random_ids(model, 2, 24, seed=1)
    drop_layers(model, budget_dropping(model, 2), calib)  # real (non-identity) blocks dropped
    ids = random_ids(model, 1, 6, seed=4)
    out = model.generate(ids, max_new_tokens=12, do_sample=False, use_cache=True, pad_token_id=0)
    seq = ids
    for _ in range(12):  # greedy decoding by full forwards without any cache
        seq = torch.cat([seq, logits(model, seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, seq)
    with torch.no_grad():
        cache = model(input_ids=ids, use_cache=True).past_key_values
    assert len(cache.layers) == 4
    effml.save(model, tmp_path)
    loaded = effml.load(tmp_path)
    assert loaded.config.num_hidden_layers == 4 and len(loaded.model.layers) == 4
    assert getattr(loaded.config, "layer_types", None) == getattr(model.config, "layer_types", None)
    assert torch.equal(logits(loaded, seq), logits(model, seq))
    assert loaded.effml_report["drop_layers"]["dropped"] == model.effml_report["drop_layers"]["dropped"]


def test_budget_is_met_by_dropping_in_influence_order():
    model = six_layers("llama")
    calib = random_ids(model, 2, 16, seed=1)
    influence = block_influence(model, calib)
    total = parameter_report(model)["non_embedding"]
    block = sum(p.numel() for p in model.model.layers[0].parameters())
    drop_layers(model, 0.6, calib)
    rep = model.effml_report["drop_layers"]
    assert rep["influence"] == pytest.approx(influence, abs=1e-6)
    # within budget, and no block more than needed was dropped
    assert rep["after"]["non_embedding"] <= 0.6 * total < rep["after"]["non_embedding"] + block
    assert rep["drop_order"] == sorted(range(6), key=lambda i: influence[i])[: len(rep["dropped"])]


def test_drop_then_recursify_keeps_the_map_to_the_original():
    model = make_identity(tiny_model("llama", num_hidden_layers=6), 2, 5)
    drop_layers(model, budget_dropping(model, 2), random_ids(model, 2, 16, seed=1))
    rec = recursify(model, num_loops=2, lora_rank=2, lora_init="svd")
    assert rec.effml_report["recursify"]["teacher_layers"] == [0, 1, 3, 4]
    assert rec.effml_report["recursify"]["teacher_num_layers"] == 6
    with pytest.raises(ValueError, match="recursive model shares.*drop layers of the original model first"):
        drop_layers(rec, 0.5, random_ids(model, 2, 16))


def test_bad_inputs_are_clear_errors():
    model = six_layers("llama")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    calib = random_ids(model, 2, 16)
    for bad in (1, 1.0, 0, -0.1, True):
        with pytest.raises(ValueError, match=r"param_budget must be a fraction in \(0, 1\)"):
            drop_layers(model, bad, calib)
    with pytest.raises(ValueError, match="needs calibration data.*effml.calibration_data"):
        drop_layers(model, 0.5, None)
    with pytest.raises(ValueError, match=r"one decoder block.*minimum param_budget here is 0\.16"):
        drop_layers(model, 0.1, calib)
    with pytest.raises(ValueError, match="calib"):
        drop_layers(model, 0.5, torch.rand(2, 16))
    assert len(model.model.layers) == 6
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_report_survives_a_copy():
    model = six_layers("llama")
    drop_layers(model, 0.7, random_ids(model, 2, 16))
    assert copy_of(model).effml_report["drop_layers"]["kept"] == model.effml_report["drop_layers"]["kept"]
