import json

import pytest
import torch
import torch.nn as nn

import effml
from effml.core.io import register_module_type
from effml.core.surgery import replace_linears
from effml.testing import FAMILIES, random_ids, tiny_model


@register_module_type
class ScaledLinear(nn.Module):
    """A test module type: a linear with a per-output scale buffer."""

    def __init__(self, in_features, out_features):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.register_buffer("scale", torch.ones(out_features))

    def forward(self, x):
        return (x @ self.weight.T) * self.scale

    def effml_spec(self):
        return {"in": self.weight.shape[1], "out": self.weight.shape[0]}

    @classmethod
    def effml_build(cls, spec):
        return cls(spec["in"], spec["out"])


@pytest.mark.parametrize("family", FAMILIES)
def test_save_load_round_trip_is_exact(family, tmp_path):
    model = tiny_model(family, tie_word_embeddings=True)
    ids = random_ids(model)

    def swap(ref):
        new = ScaledLinear(ref.module.in_features, ref.module.out_features)
        new.weight.data.copy_(ref.module.weight.data)
        new.scale.uniform_(0.5, 1.5)
        return new

    if model.model.layers[0].self_attn.o_proj.bias is None:
        replace_linears(model, swap, roles=["o"])
    model.effml_report = {"note": "kept", "value": 1.5}
    ref = model(input_ids=ids).logits
    effml.save(model, tmp_path)
    meta = json.loads((tmp_path / "effml.json").read_text())
    assert meta["format_version"] == 3 and "lm_head.weight" in meta["aliases"]
    loaded = effml.load(tmp_path)
    assert torch.equal(loaded(input_ids=ids).logits, ref)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight  # sharing restored
    assert loaded.effml_report == {"note": "kept", "value": 1.5}


def test_load_rejects_newer_format_and_foreign_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match="effml.save"):
        effml.load(tmp_path)
    model = tiny_model("llama")
    effml.save(model, tmp_path)
    meta = json.loads((tmp_path / "effml.json").read_text())
    meta["format_version"] = 99
    (tmp_path / "effml.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="upgrade effml"):
        effml.load(tmp_path)


def test_model_size_counts_shared_tensors_once():
    tied = tiny_model("llama", tie_word_embeddings=True)
    untied = tiny_model("llama", tie_word_embeddings=False)
    n_tied = sum(p.numel() for p in tied.parameters())  # parameters() already dedupes
    s = effml.model_size(tied)
    assert s["parameters"] == n_tied
    assert effml.model_size(untied)["parameters"] - s["parameters"] == 256 * 64
    assert s["bits_per_weight"] == pytest.approx(32.0, rel=1e-3)  # buffers are few bytes
