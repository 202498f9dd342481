"""format="hf-unrolled": a recursive model as a plain checkpoint any HF tool loads."""

import json

import pytest

import effml
from effml.export import export
from effml.testing import random_ids, tiny_model

from .helpers import load_hf, rel_logit_diff


@pytest.mark.parametrize("family", ["llama", "gemma2", "phi3"])
def test_unrolled_matches_recursive(family, tmp_path):
    model = effml.recursify(tiny_model(family), num_loops=2, init="average", lora_rank=8)
    ids = random_ids(model)
    out = export(model, tmp_path / "unrolled", format="hf-unrolled")
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["model_type"] == family
    report = json.loads((out / "effml_export.json").read_text())
    assert report["size_cost"] > 1.0  # shared blocks are stored once per depth
    assert rel_logit_diff(load_hf(out), model, ids) < 1e-5


def test_unrolled_then_compressed_tensors(tmp_path):
    from .helpers import max_weight_diff

    model = effml.recursify(tiny_model("qwen3"), num_loops=2, init="average", lora_rank=4)
    export(model, tmp_path / "unrolled", format="hf-unrolled")
    flat = load_hf(tmp_path / "unrolled")
    flat = effml.quantize(flat, method="rtn", w_bits=4, group_size=16)
    out = export(flat, tmp_path / "ct")
    ids = random_ids(flat)
    assert max_weight_diff(load_hf(out), flat, ids) == 0.0


def test_unrolled_refuses_plain_and_ct_refuses_recursive(tmp_path):
    with pytest.raises(ValueError, match="not recursive"):
        export(tiny_model("llama"), tmp_path / "a", format="hf-unrolled")
    rec = effml.recursify(tiny_model("llama"), num_loops=2, init="average", lora_rank=4)
    with pytest.raises(ValueError, match="hf-unrolled"):
        export(rec, tmp_path / "b")
    assert not (tmp_path / "b").exists()
