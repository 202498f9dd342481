"""SmolLM2-135M: export through the CLI, reload with effml.load_model (transformers underneath)."""

import json

import compressed_tensors  # noqa: E402,F401  (the export extra; ./run.sh installs it: fail, never skip)
import pytest

import effml
from effml.cli import main

from .helpers import max_weight_diff, rel_logit_diff


@pytest.mark.real_model
def test_smollm2_w4a16_g64_cli_export_reload(smollm2, tmp_path):
    model, tok = smollm2
    effml.quantize(model, method="rtn", w_bits=4, group_size=64)
    effml.save(model, tmp_path / "effml", tokenizer=tok)
    assert main(["export", "--model", str(tmp_path / "effml"), "--out", str(tmp_path / "ct")]) == 0
    cfg = json.loads((tmp_path / "ct" / "config.json").read_text())
    assert cfg["quantization_config"]["config_groups"]["group_0"]["weights"]["group_size"] == 64
    hf, hf_tok = effml.load_model(str(tmp_path / "ct"))  # the compressed-tensors branch: transformers loads it
    ids = tok("The capital of France is Paris. It is known for", return_tensors="pt").input_ids
    assert hf_tok(["a b c"]).input_ids == tok(["a b c"]).input_ids
    assert max_weight_diff(hf, model, ids) == 0.0
    assert rel_logit_diff(hf, model, ids) < 1e-5
    # the folder is what serving tools read: sharded safetensors + index, generation config
    files = {p.name for p in (tmp_path / "ct").iterdir()}
    assert {"model.safetensors.index.json", "generation_config.json", "tokenizer.json"} <= files


def test_cli_refuses_non_empty_out(tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("x")
    assert main(["export", "--model", str(tmp_path / "missing"), "--out", str(tmp_path / "out")]) == 2
    assert "error" in capsys.readouterr().err
