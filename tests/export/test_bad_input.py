"""Exports that cannot be faithful are refused before any file is written, saying what to do."""

import json
import logging

import compressed_tensors  # noqa: E402,F401  (the export extra; ./run.sh installs it: fail, never skip)
import pytest

import effml
from effml.export import SUPPORTED, UnsupportedScheme, export
from effml.testing import random_ids, tiny_model


def test_w4a4_refused_with_supported_list(tmp_path):
    model = effml.quantize(tiny_model("llama"), method="rtn", w_bits=4, a_bits=4)
    with pytest.raises(UnsupportedScheme, match="W4A4 has no consumer") as e:
        export(model, tmp_path / "x")
    assert SUPPORTED in str(e.value)
    assert not (tmp_path / "x").exists()


def test_w4a8_refused(tmp_path):
    model = effml.quantize(tiny_model("llama"), method="rtn", w_bits=4, a_bits=8)
    with pytest.raises(UnsupportedScheme, match="W4A8"):
        export(model, tmp_path / "x")


def test_quarot_without_rotation_exports(tmp_path):
    from .helpers import load_hf, max_weight_diff

    model = effml.quantize(tiny_model("llama"), method="quarot", w_bits=4, rotate=False, w_mse=False)
    ids = random_ids(model)
    assert max_weight_diff(load_hf(export(model, tmp_path / "x")), model, ids) == 0.0


def test_kv_cache_needs_drop(tmp_path, caplog):
    model = effml.quantize(tiny_model("llama"), method="rtn", w_bits=4, kv_bits=4)
    with pytest.raises(UnsupportedScheme, match="kv_cache='drop'"):
        export(model, tmp_path / "x")
    with caplog.at_level(logging.WARNING):
        out = export(model, tmp_path / "x", kv_cache="drop")
    notes = json.loads((out / "effml_export.json").read_text())["notes"]
    assert any("float KV cache" in n for n in notes) and "float KV cache" in caplog.text


def test_non_empty_dir(tmp_path):
    model = effml.quantize(tiny_model("llama"), method="rtn", w_bits=4)
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        export(model, tmp_path / "x")
    export(model, tmp_path / "x", overwrite=True)
    assert (tmp_path / "x" / "config.json").is_file()


def test_still_calibrating_refused(tmp_path):
    model = effml.quantize(tiny_model("llama"), method="rtn", w_bits=8, a_bits=8)
    model.model.layers[0].self_attn.q_proj.act_quant.ste = True
    with pytest.raises(ValueError, match="still calibrating"):
        export(model, tmp_path / "x")


def test_bad_arguments(tmp_path):
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="format must be one of"):
        export(model, tmp_path / "x", format="gguf")
    with pytest.raises(ValueError, match="kv_cache must be"):
        export(model, tmp_path / "x", kv_cache="fp8")


def test_unknown_family_warns(tmp_path, caplog, monkeypatch):
    from effml.export import api

    model = effml.quantize(tiny_model("llama"), method="rtn", w_bits=4)
    monkeypatch.setattr(api, "VLLM_FAMILIES", api.VLLM_FAMILIES - {"llama"})
    with caplog.at_level(logging.WARNING):
        export(model, tmp_path / "x")
    assert "'llama' is not one vLLM is known to implement" in caplog.text
