"""effml.save / effml.load of recursive models: exact outputs, sharing restored, no pickle."""

import json
import math

import pytest
import torch
from safetensors import safe_open

import effml
from effml.recursive import recursify
from effml.testing import random_ids, tiny_model


@pytest.mark.parametrize("family,kwargs", [
    ("llama", dict(init="average", lora_rank=4)),
    ("phi3", dict(init="stepwise", lora_rank={"q": 2, "v": 3, "down": 4}, lora_targets=("q", "v", "down"))),
    ("gemma3_text", dict(init="lower", strategy="sequence", lora_rank=3, tie_norms="foldable")),
    ("qwen2", dict(init="average", lora_rank=0, strategy="middle_cycle")),
])
def test_save_load_exact_and_shared(tmp_path, family, kwargs):
    model = recursify(tiny_model(family), num_loops=2, **kwargs)
    with torch.no_grad():  # trained-looking weights, so nothing passes by being zero
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 1e-2)
    ids = random_ids(model)
    effml.save(model, tmp_path)
    loaded = effml.load(tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    # sharing survives as parameter identity, so training after a reload updates one tensor
    names = {n for n, _ in model.named_parameters()}
    assert {n for n, _ in loaded.named_parameters()} == names
    assert effml.model_size(loaded)["parameters"] == effml.model_size(model)["parameters"]
    meta = json.loads((tmp_path / "effml.json").read_text())
    assert meta["transforms"][0]["type"] == "recursify"
    assert meta["report"]["recursify"]["after"]["non_embedding"] < meta["report"]["recursify"]["before"]["non_embedding"]
    layers = loaded.model.layers
    for group in loaded.effml_recursive["layout"]["groups"]:
        for name in loaded.effml_recursive["layout"]["tied_params"]:
            assert all(layers[d].get_parameter(name) is layers[group[0]].get_parameter(name) for d in group)
    # each shared tensor is stored once
    unique = {}
    for t in model.state_dict().values():
        unique.setdefault((t.data_ptr(), tuple(t.shape)), t.numel())
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        stored = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    assert stored == sum(unique.values())


def test_load_state_dict_assign_keeps_sharing():
    model = recursify(tiny_model("llama"), num_loops=2, lora_rank=2)
    model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()}, assign=True)
    assert model.model.layers[0].self_attn.q_proj.weight is model.model.layers[2].self_attn.q_proj.weight
