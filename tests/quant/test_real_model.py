import pytest
import torch

import effml
from effml.quant import quantize


@pytest.mark.real_model
def test_smollm2_w4_round_trip_and_size(smollm2, tmp_path):
    model, tok = smollm2
    ids = tok("The capital of France is Paris. It is known for", return_tensors="pt").input_ids
    quantize(model, "rtn", w_bits=4, a_bits=8, kv_bits=8, group_size=64)
    bits = model.effml_report["linear_bits_per_weight"]
    assert 4.0 < bits < 4.5  # packed int4 + one fp16 scale per 64 weights = 4.25
    effml.save(model, tmp_path)
    loaded = effml.load(tmp_path)
    assert torch.equal(loaded(ids).logits, model(ids).logits)
