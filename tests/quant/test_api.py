import pytest
import torch

import effml
from effml.quant import methods, quantize
from effml.testing import FAMILIES, random_ids, tiny_model


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", methods())
def test_sixteen_bit_settings_reproduce_the_model(family, method):
    model = tiny_model(family)
    ids = random_ids(model, 2, 16)
    ref = model(ids).logits
    quantize(model, method, w_bits=16, a_bits=16, kv_bits=16, calib=ids, **_fast(method))
    torch.testing.assert_close(model(ids).logits, ref, rtol=0, atol=1e-4)
    assert model.effml_report["method"] == method


def _fast(method):
    return {"epochs": 0} if method == "flatquant" else {}


@pytest.mark.parametrize("family,method", [
    ("llama", "rtn"), ("phi3", "gptq"), ("gemma3_text", "gptq"), ("qwen2", "quarot"), ("gemma2", "flatquant"),
    ("phi3", "flatquant"), ("qwen3", "smoothquant"),
])
def test_save_load_round_trip_is_exact(family, method, tmp_path):
    model = tiny_model(family)
    ids = random_ids(model, 2, 16)
    extra = {"group_size": 16} if method == "rtn" else _fast(method)
    quantize(model, method, w_bits=4, a_bits=4, kv_bits=4, calib=ids, **extra)
    effml.save(model, tmp_path)
    loaded = effml.load(tmp_path)
    assert torch.equal(loaded(ids).logits, model(ids).logits)
    assert loaded.effml_report["method"] == method
    assert effml.model_size(loaded) == effml.model_size(model)


def test_w4_weights_quantized_and_close():
    model = tiny_model("llama", hidden_size=128, intermediate_size=256)
    ids = random_ids(model, 2, 16)
    ref = model(ids).logits
    quantize(model, "rtn", w_bits=8)
    # 8-bit weights barely move the logits; 2-bit ones move them a lot
    assert (model(ids).logits - ref).abs().max() < 0.05
    model2 = tiny_model("llama", hidden_size=128, intermediate_size=256)
    quantize(model2, "rtn", w_bits=2)
    assert (model2(ids).logits - ref).abs().max() > 0.05


def test_bad_inputs_have_clear_errors():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="unknown quantization method 'awq'.*rtn"):
        quantize(model, "awq")
    with pytest.raises(ValueError, match="w_bits=9"):
        quantize(model, "rtn", w_bits=9)
    with pytest.raises(ValueError, match="a_bits=1"):
        quantize(model, "rtn", a_bits=1)
    with pytest.raises(ValueError, match="group_size=48 does not divide.*64"):
        quantize(model, "rtn", group_size=48)
    with pytest.raises(ValueError, match="unknown option.*blocksize"):
        quantize(model, "gptq", blocksize=64)
    with pytest.raises(ValueError, match="calibration token ids"):
        quantize(model, "gptq", calib=None)


def test_nan_in_calibration_stops_with_the_layer_name():
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[2].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"layers\.2"):
        quantize(model, "gptq", calib=random_ids(model, 2, 16))
