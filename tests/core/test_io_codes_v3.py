"""Format 3 stores 8-bit QuantLinear codes as ``code ^ 0x80`` (int8 in place for the CPU
kernels): a W8A8 model round-trips bit for bit onto the fast path, and format 1/2 folders (codes
stored as they are) load to the very same weights."""

import json

import pytest
import torch
from effml.kernels import dispatch
from safetensors.torch import load_file, save_file

import effml
from effml.core.io import FORMAT_VERSION, META_FILE, WEIGHTS_FILE, file_digest
from effml.quant.qlinear import QuantLinear
from effml.testing import random_ids, tiny_model


def _w8a8():
    model = effml.quantize(tiny_model("llama"), "rtn", w_bits=8, a_bits=8)
    layers = model.model.layers
    # other layouts in the same folder: 8-bit asymmetric, 6-bit (stored unchanged), and a
    # qweight shared by two modules (stored once, an alias: converted once)
    up = layers[0].mlp.up_proj
    up.set_quantized_weight(up.dequantized_weight(), 8, sym=False)
    down = layers[1].mlp.down_proj
    down.set_quantized_weight(down.dequantized_weight(), 6)
    a, b = layers[2].self_attn.o_proj, layers[3].self_attn.o_proj
    for name in ("qweight", "scales"):
        b._buffers[name] = a._buffers[name]
    return model


def _weights(model):
    return {n: m.dequantized_weight().clone() for n, m in model.named_modules()
            if isinstance(m, QuantLinear) and m.weight is None}


@pytest.mark.parametrize("a_bits,path", [(8, "cpu_intmm"), (16, "cpu_int8w")])
def test_w8_round_trip_is_exact_and_on_the_fast_path(tmp_path, a_bits, path):
    model = _w8a8() if a_bits == 8 else effml.quantize(tiny_model("llama"), "rtn", w_bits=8, a_bits=16)
    ids = random_ids(model, n=1, seq_len=10)
    with torch.no_grad():
        before = model(ids).logits
    effml.save(model, tmp_path)
    assert json.loads((tmp_path / META_FILE).read_text())["format_version"] == FORMAT_VERSION == 3
    loaded = effml.load(tmp_path)
    sq = loaded.model.layers[0].self_attn.q_proj
    assert torch.equal(sq.qweight, model.model.layers[0].self_attn.q_proj.qweight)  # stored bytes as saved
    dispatch.calls.clear()
    with torch.no_grad():  # safetensors' memory is 8-byte aligned: the kernels realign qweight
        after = loaded(ids).logits
    assert torch.equal(after, before)
    assert dispatch.calls[path] > 0 and dispatch.calls["torch"] == (1 if a_bits == 8 else 0)  # 8-bit asym
    assert sq._kernel_cache["w8"].untyped_storage().data_ptr() == sq.qweight.untyped_storage().data_ptr()


def _rewrite_as_format_2(path, model):
    """What an effml of format 2 wrote for ``model``: 8-bit codes stored as they are (undo the
    ``^ 0x80``), format_version 2, the digest of that file."""
    meta = json.loads((path / META_FILE).read_text())
    state = load_file(str(path / WEIGHTS_FILE))
    eight_bit = [f"{n}.qweight" for n, m in model.named_modules()
                 if isinstance(m, QuantLinear) and m.weight is None and m.w_bits == 8]
    old = {k for k in eight_bit if k in state}
    assert old and len(old) < len(eight_bit)  # the shared qweight is stored once
    for k in old:
        state[k] = state[k] ^ 0x80
    save_file(state, str(path / WEIGHTS_FILE), metadata={"format": "pt", "effml_format_version": "2"})
    meta["format_version"] = 2
    meta["weights"] = {WEIGHTS_FILE: file_digest(path / WEIGHTS_FILE)}
    (path / META_FILE).write_text(json.dumps(meta))
    return meta


def test_format_2_folder_loads_to_the_same_weights(tmp_path):
    model = _w8a8()
    ids = random_ids(model, n=1, seq_len=10)
    with torch.no_grad():
        before = model(ids).logits
    effml.save(model, tmp_path)
    _rewrite_as_format_2(tmp_path, model)
    loaded = effml.load(tmp_path)  # verified against the digest of the old bytes, then converted
    want, got = _weights(model), _weights(loaded)
    assert want.keys() == got.keys() and all(torch.equal(got[k], want[k]) for k in want)
    for name, m in loaded.named_modules():
        if isinstance(m, QuantLinear) and m.weight is None:  # stored bytes: format 3's
            assert torch.equal(m.qweight, model.get_submodule(name).qweight), name
    a, b = loaded.model.layers[2].self_attn.o_proj, loaded.model.layers[3].self_attn.o_proj
    assert a.qweight is b.qweight  # sharing restored
    effml.save(loaded, tmp_path / "again")  # and re-saved as format 3
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, before)
        assert torch.equal(effml.load(tmp_path / "again")(ids).logits, before)


def test_format_1_folder_is_converted_too(tmp_path):
    model = _w8a8()
    effml.save(model, tmp_path)
    meta = _rewrite_as_format_2(tmp_path, model)
    del meta["weights"]
    meta["format_version"] = 1
    (tmp_path / META_FILE).write_text(json.dumps(meta))
    want, got = _weights(model), _weights(effml.load(tmp_path))
    assert all(torch.equal(got[k], want[k]) for k in want)
