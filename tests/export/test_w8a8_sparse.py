"""SmoothQuant W8A8 (int-quantized) and pruned (+ GPTQ) exports, loaded by transformers."""

import json

import compressed_tensors  # noqa: E402,F401  (the export extra; ./run.sh installs it: fail, never skip)
import pytest

import effml
from effml.export import export
from effml.testing import FAMILIES, random_ids, tiny_model

from .helpers import load_hf, max_weight_diff, rel_logit_diff


@pytest.mark.parametrize("family", FAMILIES)
def test_smoothquant_w8a8(family, tmp_path):
    model = tiny_model(family)
    ids = random_ids(model)
    model = effml.quantize(model, method="smoothquant", w_bits=8, a_bits=8, calib=random_ids(model, n=2, seed=1))
    out = export(model, tmp_path / "ct")
    q = json.loads((out / "config.json").read_text())["quantization_config"]
    group = q["config_groups"]["group_0"]
    assert q["format"] == "int-quantized"
    assert group["input_activations"]["strategy"] == "token" and group["input_activations"]["dynamic"]
    # weights and the norms holding 1/s are exact; transformers runs the weights as W8A16
    hf = load_hf(out)
    assert max_weight_diff(hf, model, ids) == 0.0


def _prune_then_gptq(family, pattern):
    model = tiny_model(family)
    calib = random_ids(model, n=2, seed=1)
    model = effml.prune(model, sparsity=None, method="sparsegpt", allocation="uniform", pattern=pattern, calib=calib)
    return effml.quantize(model, method="gptq", w_bits=4, group_size=16, calib=calib)


@pytest.mark.parametrize("family", ["llama", "phi3"])
def test_pruned_dense_sparsity_config(family, tmp_path):
    model = tiny_model(family)
    ids = random_ids(model)
    model = effml.prune(model, sparsity=0.5, method="wanda", allocation="uniform", calib=random_ids(model, n=2, seed=1))
    out = export(model, tmp_path / "ct")
    q = json.loads((out / "config.json").read_text())["quantization_config"]
    s = q["sparsity_config"]
    assert s["format"] == "dense" and s["sparsity_structure"] == "unstructured"
    assert s["global_sparsity"] == pytest.approx(0.5, abs=0.01)
    hf = load_hf(out)
    assert max_weight_diff(hf, model, ids) == 0.0
    assert rel_logit_diff(hf, model, ids) < 1e-5


def test_pruned_24_then_gptq(tmp_path):
    model = _prune_then_gptq("llama", "2:4")
    ids = random_ids(model)
    out = export(model, tmp_path / "ct")
    q = json.loads((out / "config.json").read_text())["quantization_config"]
    assert q["format"] == "pack-quantized"
    hf = load_hf(out)
    assert max_weight_diff(hf, model, ids) == 0.0
    assert rel_logit_diff(hf, model, ids) < 1e-5
    # the zeros survive: the loaded weights are as sparse as effml's
    w = hf.model.layers[0].mlp.down_proj.weight
    assert q["sparsity_config"]["sparsity_structure"] == "2:4"
    assert float((w == 0).float().mean()) >= 0.5
