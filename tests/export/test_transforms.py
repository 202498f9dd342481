"""QuaRot / FlatQuant online transforms exported as compressed-tensors ``transform_config``:
loaded by transformers plus compressed-tensors' own ``apply_transform_config`` (what
``effml.load_model`` does), checked against effml's model; the format's scaling convention
checked by hand; what cannot be exported refused."""

import json
import math

import compressed_tensors  # noqa: E402,F401  (the export extra; ./run.sh installs it: fail, never skip)
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from compressed_tensors.transform import TransformConfig, apply_transform_config

import effml
from effml.export import SUPPORTED, UnsupportedScheme, export
from effml.export.transforms import (
    TransformGroup,
    ct_constructible,
    load_transforms,
    transform_config,
    transform_tensors,
)
from effml.quant.hadamard import hadamard
from effml.quant.qlinear import QuantLinear
from effml.quant.transforms import KroneckerTransform
from effml.testing import FAMILIES, random_ids, tiny_model

from .helpers import load_hf, max_transform_diff, max_weight_diff, rel_logit_diff, transform_modules


def _load(out):
    return load_transforms(load_hf(out), out)


def _flatquant(model, **kw):
    calib = random_ids(model, n=2, seq_len=16, seed=1)
    return effml.quantize(model, method="flatquant", calib=calib, epochs=1, n_samples=2, seq_len=16, **kw)


def hooks_of(model):
    from effml.quant.kv import AttentionQuant

    return [m for m in model.modules() if isinstance(m, AttentionQuant)]


def _no_act_quant(model):
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.act_quant = None
    return model


# --- the format's convention, by hand ---------------------------------------------------------

def test_kronecker_dense_is_x_at_t():
    g = torch.Generator().manual_seed(0)
    t = KroneckerTransform.from_factors(torch.randn(3, 3, generator=g), torch.randn(4, 4, generator=g), 12,
                                        scale=torch.rand(12, generator=g) + 0.5)
    x = torch.randn(5, 12, generator=g, dtype=torch.float64)
    assert torch.allclose(t.dense() @ torch.eye(12, dtype=torch.float64), t.dense())
    assert torch.allclose(x @ t.dense(), t(x.float()).double(), atol=1e-5)
    left_only = KroneckerTransform.from_factors(torch.randn(3, 3, generator=g), None, 12)
    assert torch.allclose((x @ left_only.dense()).float(), left_only(x.float()), atol=1e-5)


@pytest.mark.parametrize("kind", ["random-hadamard", "hadamard"])
def test_scaling_convention(kind):
    """A hand-built group: compressed-tensors must compute Linear(x @ T) from the stored
    sqrt(n) * T. T is neither symmetric nor orthogonal (random-hadamard), so applying Tᵀ,
    T⁻¹ or forgetting / doubling the 1/sqrt(n) would all fail."""
    n = 16
    g = torch.Generator().manual_seed(0)
    t = torch.randn(n, n, generator=g, dtype=torch.float64) if kind == "random-hadamard" \
        else hadamard(n) / math.sqrt(n)
    group = TransformGroup("g0", ["lin"], kind, t * math.sqrt(n))
    model = nn.Module()
    model.lin = nn.Linear(n, 5)
    cfg = TransformConfig.model_validate(transform_config([group]))
    apply_transform_config(model, cfg)
    missing, unexpected = model.load_state_dict(transform_tensors([group], torch.float32), strict=False)
    assert not unexpected and set(missing) == {"lin.weight", "lin.bias"}
    x = torch.randn(3, n, generator=g)
    want = F.linear((x.double() @ t).float(), model.lin.weight, model.lin.bias)
    with torch.no_grad():
        got = model.lin(x)
    assert torch.allclose(got, want, atol=1e-5)
    if kind == "random-hadamard":
        assert not torch.allclose(got, F.linear((x.double() @ t.T).float(), model.lin.weight, model.lin.bias),
                                  atol=1e-2)


def test_ct_constructible_matches_compressed_tensors():
    from compressed_tensors.transform.utils.hadamard import random_hadamard_matrix

    for n in [*range(1, 300), 4 * 67, 8 * 67, 576, 1536]:
        try:
            random_hadamard_matrix(n, torch.float32)
            ok = True
        except ValueError:
            ok = False
        assert ct_constructible(n) == ok, n


# --- QuaRot / FlatQuant exports, loaded back --------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_quarot_w4a16(family, tmp_path):
    model = tiny_model(family)
    ids = random_ids(model)
    model = effml.quantize(model, method="quarot", w_mse=False, w_bits=4, group_size=16)
    out = export(model, tmp_path / "ct")
    q = json.loads((out / "config.json").read_text())["quantization_config"]
    groups = q["transform_config"]["config_groups"]
    # one group per layer and site: q/k/v (one input), o, gate/up, down
    assert len(groups) == 4 * model.config.num_hidden_layers
    assert {g["type"] for g in groups.values()} == {"random-hadamard"}
    hf = _load(out)
    assert max_weight_diff(hf, model, ids) == 0.0
    assert max_transform_diff(hf, model) < 1e-6
    assert rel_logit_diff(hf, model, ids) < 1e-5


def test_quarot_needs_the_transforms(tmp_path):
    """Without applying transform_config (plain transformers 5.24) the logits are wrong: the
    test above cannot pass without them."""
    model = effml.quantize(tiny_model("llama"), method="quarot", w_mse=False, w_bits=4)
    ids = random_ids(model)
    out = export(model, tmp_path / "ct")
    assert rel_logit_diff(load_hf(out), model, ids) > 1e-2
    assert rel_logit_diff(_load(out), model, ids) < 1e-5


@pytest.mark.parametrize("kw", [dict(w_bits=4, group_size=16), dict(w_bits=4, w_sym=False, weight_quantizer="gptq")])
def test_flatquant_w4a16(kw, tmp_path):
    model = tiny_model("llama")
    ids = random_ids(model)
    model = _flatquant(model, **kw)
    out = export(model, tmp_path / "ct")
    hf = _load(out)
    assert max_weight_diff(hf, model, ids) == 0.0
    assert max_transform_diff(hf, model) < 1e-6
    assert rel_logit_diff(hf, model, ids) < 1e-5


@pytest.mark.parametrize("method", ["quarot", "flatquant"])
def test_w8a8(method, tmp_path):
    """Weights and transforms exact. transformers' compressed-tensors fake-quantizes activations
    with scale absmax/127.5 (effml and vLLM: absmax/127), so the logits are compared with
    activation quantization off on both sides: what is left is the transform and the weights."""
    from compressed_tensors.quantization.lifecycle.helpers import disable_quantization

    model = tiny_model("llama")
    ids = random_ids(model)
    if method == "quarot":
        model = effml.quantize(model, method="quarot", w_mse=False, w_bits=8, a_bits=8, a_clip=1.0)
    else:
        model = _flatquant(model, w_bits=8, a_bits=8, lac=False)
    out = export(model, tmp_path / "ct")
    q = json.loads((out / "config.json").read_text())["quantization_config"]
    assert q["format"] == "int-quantized" and q["transform_config"]["config_groups"]
    hf = _load(out)
    assert max_weight_diff(hf, model, ids) == 0.0
    assert max_transform_diff(hf, model) < 1e-6
    hf.apply(disable_quantization)
    assert rel_logit_diff(hf, _no_act_quant(model), ids) < 1e-5


def test_sylvester_hadamard_uses_hadamard_type(tmp_path):
    """A transform that is exactly the normalised Sylvester Hadamard goes out as the format's own
    ``hadamard`` type with its ±1 matrix."""
    from effml.quant.apply import wrap_linears
    from effml.quant.rotate import install_transform

    model = tiny_model("llama")
    ids = random_ids(model)
    wrapped = wrap_linears(model)
    h8 = (hadamard(8) / math.sqrt(8)).float()
    qkv = [wrapped[f"model.layers.0.self_attn.{p}_proj"] for p in "qkv"]
    install_transform(qkv, KroneckerTransform.from_factors(h8, h8, 64))
    model = effml.quantize(model, method="rtn", w_bits=4)
    assert qkv[0].input_transform is not None  # rtn kept the installed transform
    out = export(model, tmp_path / "ct")
    groups = json.loads((out / "config.json").read_text())["quantization_config"]["transform_config"]["config_groups"]
    assert [g["type"] for g in groups.values()] == ["hadamard"]
    hf = _load(out)
    w = next(iter(transform_modules(hf).values())).weight
    assert torch.equal(w, hadamard(64).float())
    assert max_transform_diff(hf, model) < 1e-6
    assert rel_logit_diff(hf, model, ids) < 1e-5


def test_float_linears_fold_their_transform(tmp_path):
    """QuaRot at 16-bit weights: x T Wᵀ = x (W Tᵀ)ᵀ, so the export is a plain dense model."""
    model = tiny_model("qwen2")
    ids = random_ids(model)
    model = effml.quantize(model, method="quarot", w_mse=False, w_bits=16)
    out = export(model, tmp_path / "ct")
    assert json.loads((out / "config.json").read_text()).get("quantization_config") is None
    hf = load_hf(out)
    assert not transform_modules(hf)
    assert rel_logit_diff(hf, model, ids) < 1e-5


# --- post-RoPE Q/K transforms with the KV cache in floating point ------------------------------

def test_qk_transform_drop_exact_when_not_orthogonal(tmp_path):
    """Keys get P and queries P^{-T}: q P^{-T} (k P)ᵀ = q kᵀ for any invertible P, so with a
    float KV cache the transform is left out exactly, orthogonal or not."""
    from effml.quant.kv import install_attention_quant

    model = tiny_model("llama")
    ids = random_ids(model)
    g = torch.Generator().manual_seed(0)
    d = model.config.head_dim
    for hooks in install_attention_quant(model, 16, 16):
        p = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))[0] \
            @ torch.diag(torch.rand(d, generator=g, dtype=torch.float64) * 3 + 0.2)  # U diag(s): not orthogonal
        hooks.set_qk_transform(p.float())
        assert float((p.T @ p - torch.eye(d, dtype=torch.float64)).abs().max()) > 0.5
    model = effml.quantize(model, method="rtn", w_bits=4)
    assert all(h.k_transform is not None for h in hooks_of(model))
    out = export(model, tmp_path / "ct")
    notes = json.loads((out / "effml_export.json").read_text())["notes"]
    assert any("Q/K transforms left out" in n for n in notes)
    assert rel_logit_diff(load_hf(out), model, ids) < 1e-5


def test_flatquant_kv4_needs_drop_then_matches_float_kv(tmp_path):
    from effml.quant.act import ActQuantizer

    model = tiny_model("llama")
    ids = random_ids(model)
    model = _flatquant(model, w_bits=4, kv_bits=4)
    hooks = hooks_of(model)
    assert hooks and all(h.k_transform is not None for h in hooks)  # FlatQuant's P_h on the keys
    with pytest.raises(UnsupportedScheme, match="kv_cache='drop'"):
        export(model, tmp_path / "ct")
    out = export(model, tmp_path / "ct", kv_cache="drop")
    hf = _load(out)
    for h in hooks:  # effml with a float KV cache, P_h kept: what the export must compute
        h.k_quant, h.v_quant = ActQuantizer(16), ActQuantizer(16)
    assert rel_logit_diff(hf, model, ids) < 1e-5


# --- refused ----------------------------------------------------------------------------------

def test_quarot_w4a4_refused(tmp_path):
    model = effml.quantize(tiny_model("llama"), method="quarot", w_mse=False, w_bits=4, a_bits=4, kv_bits=4)
    with pytest.raises(UnsupportedScheme, match="W4A4 has no consumer") as e:
        export(model, tmp_path / "x", kv_cache="drop")
    assert "a_bits=16" in str(e.value) and SUPPORTED in str(e.value)
    assert not (tmp_path / "x").exists()


def test_quarot_w8a8_clipped_refused(tmp_path):
    model = effml.quantize(tiny_model("llama"), method="quarot", w_mse=False, w_bits=8, a_bits=8)  # a_clip 0.9
    with pytest.raises(UnsupportedScheme, match="a_clip=1.0"):
        export(model, tmp_path / "x")


def test_flatquant_w8a8_learned_clipping_refused(tmp_path):
    model = _flatquant(tiny_model("llama"), w_bits=8, a_bits=8)
    with pytest.raises(UnsupportedScheme, match="lac=False"):
        export(model, tmp_path / "x")


def test_foreign_transform_refused(tmp_path):
    model = effml.quantize(tiny_model("llama"), method="rtn", w_bits=4)
    model.model.layers[0].mlp.down_proj.input_transform = nn.Identity()
    with pytest.raises(UnsupportedScheme, match="only effml's KroneckerTransform"):
        export(model, tmp_path / "x")


def test_size_compressed_tensors_cannot_build_refused(tmp_path):
    # 134 = 2 * 67: not a multiple of 4, so no Hadamard placeholder of that size in compressed-tensors
    model = effml.quantize(tiny_model("llama", intermediate_size=134), method="quarot", w_mse=False, w_bits=4)
    with pytest.raises(UnsupportedScheme, match="size 134"):
        export(model, tmp_path / "x")
    assert not (tmp_path / "x").exists()
