"""Weight-only RTN / GPTQ exports load in transformers with effml's exact weights and logits."""

import compressed_tensors  # noqa: E402,F401  (the export extra; ./run.sh installs it: fail, never skip)
import pytest
import torch

import effml
from effml.export import export
from effml.testing import FAMILIES, random_ids, tiny_model

from .helpers import load_hf, max_weight_diff, rel_logit_diff

# every family: per channel symmetric (RTN) and grouped asymmetric act-order (GPTQ); the other
# combinations once below
SCHEMES = {
    "rtn-w4-channel": dict(method="rtn", w_bits=4),
    "gptq-w4-g16-asym-actorder": dict(method="gptq", w_bits=4, group_size=16, w_sym=False, act_order=True),
}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_weight_only_roundtrip(family, scheme, tmp_path):
    model = tiny_model(family)
    ids = random_ids(model, n=2, seq_len=16)
    calib = random_ids(model, n=2, seq_len=16, seed=1)
    model = effml.quantize(model, calib=calib, **SCHEMES[scheme])
    out = export(model, tmp_path / "ct")
    hf = load_hf(out)
    assert max_weight_diff(hf, model, ids) == 0.0
    assert rel_logit_diff(hf, model, ids) < 1e-5


@pytest.mark.parametrize("kw", [dict(method="rtn", w_bits=4, group_size=16, w_sym=False),
                                dict(method="gptq", w_bits=4, group_size=16, act_order=True)])
def test_more_schemes(kw, tmp_path):
    model = tiny_model("qwen3")
    ids = random_ids(model)
    model = effml.quantize(model, calib=random_ids(model, n=2, seq_len=16, seed=1), **kw)
    hf = load_hf(export(model, tmp_path / "ct"))
    assert max_weight_diff(hf, model, ids) == 0.0
    assert rel_logit_diff(hf, model, ids) < 1e-5


def test_gptq_channel_asym_no_actorder(tmp_path):
    model = tiny_model("llama")
    ids = random_ids(model)
    model = effml.quantize(model, method="gptq", w_bits=4, w_sym=False, act_order=False,
                           calib=random_ids(model, n=2, seq_len=16, seed=1))
    hf = load_hf(export(model, tmp_path / "ct"))
    assert max_weight_diff(hf, model, ids) == 0.0
    assert rel_logit_diff(hf, model, ids) < 1e-5


@pytest.mark.parametrize("bits", [2, 3, 8])
def test_other_bit_widths(bits, tmp_path):
    model = tiny_model("llama")
    ids = random_ids(model)
    model = effml.quantize(model, method="rtn", w_bits=bits, group_size=32, w_sym=bits != 3)
    hf = load_hf(export(model, tmp_path / "ct"))
    assert max_weight_diff(hf, model, ids) == 0.0
    assert rel_logit_diff(hf, model, ids) < 1e-5


def test_layout_and_config(tmp_path):
    import json

    model = effml.quantize(tiny_model("qwen2"), method="rtn", w_bits=4, group_size=32)
    out = export(model, tmp_path / "ct", max_shard_bytes=100_000)
    files = {p.name for p in out.iterdir()}
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and shards <= files
    assert {"config.json", "generation_config.json", "effml_export.json"} <= files
    q = json.loads((out / "config.json").read_text())["quantization_config"]
    assert q["quant_method"] == "compressed-tensors" and q["format"] == "pack-quantized"
    assert q["sparsity_config"] == {}  # 4-bit rounding makes zeros, but the model was not pruned
    w = q["config_groups"]["group_0"]["weights"]
    assert (w["num_bits"], w["strategy"], w["group_size"], w["symmetric"]) == (4, "group", 32, True)
    from compressed_tensors.quantization import QuantizationConfig

    QuantizationConfig.model_validate(q)  # the library's own schema accepts it
    from safetensors import safe_open

    name = index["weight_map"]["model.layers.0.mlp.down_proj.weight_packed"]
    with safe_open(str(out / name), "pt") as f:
        packed = f.get_tensor("model.layers.0.mlp.down_proj.weight_packed")
        scale = f.get_tensor("model.layers.0.mlp.down_proj.weight_scale")
    assert packed.dtype == torch.int32 and packed.shape == (64, 96 * 4 // 32)
    assert scale.shape == (64, 96 // 32)
