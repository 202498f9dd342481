"""Recursify, then quantize: the shared block is quantized once and stays shared at every depth,
the per-depth LoRA stays in floating point, and save/load reproduces the logits exactly."""

import copy

import pytest
import torch

import effml
from effml.core.arch import get_arch, get_submodule
from effml.quant.qlinear import QuantLinear
from effml.recursive.lora import DepthLoRALinear
from effml.testing import FAMILIES, random_ids, tiny_model

_RECURSIVE: dict = {}


def _recursive(family: str, **kwargs):
    key = (family, tuple(sorted(kwargs.items())))
    if key not in _RECURSIVE:
        model = tiny_model(family)
        effml.recursify(model, num_loops=2, init="average", lora_rank=4, **kwargs)
        _RECURSIVE[key] = model
    return copy.deepcopy(_RECURSIVE[key])


def _check_shared(model):
    """Every depth of a group routes through the very same QuantLinear; LoRA stays float."""
    arch = get_arch(model)
    layers = get_submodule(model, arch.layers)
    for group in model.effml_recursive["layout"]["groups"]:
        for path in arch.linear_paths():
            mods = [get_submodule(layers[d], path) for d in group]
            assert all(isinstance(m, DepthLoRALinear) for m in mods), path
            base = mods[0].base
            assert isinstance(base, QuantLinear) and base.weight is None and base.w_bits == 4
            for m in mods[1:]:
                assert m.base is base
                for name, buf in base.named_buffers():
                    assert m.base.get_buffer(name) is buf
            for m in mods:
                assert all(p.dtype == torch.float32 for p in m.lora_parameters())


@pytest.mark.parametrize("family", FAMILIES)
def test_recursive_then_rtn_and_gptq_stay_shared_and_round_trip(tmp_path, family):
    for method in ("rtn", "gptq"):
        model = _recursive(family)
        ids = random_ids(model, 2, 16)
        params = effml.model_size(model)["parameters"]
        lora = sum(p.numel() for m in model.modules() if isinstance(m, DepthLoRALinear) for p in m.lora_parameters())
        effml.quantize(model, method, w_bits=4, calib=ids)
        _check_shared(model)
        size = effml.model_size(model)
        assert size["parameters"] == params  # shared weights counted once, as before quantizing
        # bytes: each shared QuantLinear once, next to the unchanged float LoRA factors
        quant_bytes = sum(m.effml_storage()[1] for m in model.modules() if isinstance(m, QuantLinear))
        assert lora > 0 and quant_bytes < size["bytes"]
        out = tmp_path / method
        effml.save(model, out)
        loaded = effml.load(out)
        with torch.no_grad():
            assert torch.equal(loaded(ids).logits, model(ids).logits)
        _check_shared(loaded)
        assert effml.model_size(loaded) == size


def test_gptq_accumulates_one_hessian_over_all_depths():
    """The shared q_proj is quantized from ONE Hessian of both depths' inputs (full-precision
    propagation): redoing GPTQ by hand with that Hessian gives the stored weight exactly."""
    from effml.core.calibrate import LayerwiseEngine
    from effml.core.hessian import Hessian
    from effml.quant.gptq import gptq_quantize

    model = _recursive("llama")
    ids = random_ids(model, 2, 16)
    layers = model.model.layers
    hess = Hessian(model.config.hidden_size)

    def seen(ctx):  # q_proj inputs of depths 0 and 2, which share one block
        if ctx.index in (0, 2):
            with ctx.hooks({"q": ctx.block.self_attn.q_proj}, lambda n, m, x, y: hess.add(x)):
                ctx.forward(keep=False)

    LayerwiseEngine(model, ids).run(seen, propagate="original")
    w = layers[0].self_attn.q_proj.weight.detach().clone()
    q, *_ = gptq_quantize(w, hess.h, 4)
    effml.quantize(model, "gptq", w_bits=4, calib=ids)
    torch.testing.assert_close(layers[2].self_attn.q_proj.base.dequantized_weight(), q, rtol=0, atol=1e-6)


@pytest.mark.parametrize("family,tie_norms", [("llama", True), ("gemma2", False), ("phi3", True)])
def test_recursive_smoothquant_is_exact_before_rounding_and_stays_shared(tmp_path, family, tie_norms):
    model = _recursive(family, tie_norms=tie_norms)
    ids = random_ids(model, 2, 16)
    with torch.no_grad():
        ref = model(ids).logits
    smooth = copy.deepcopy(model)
    effml.quantize(smooth, "smoothquant", w_bits=16, a_bits=16, calib=ids)  # the scaling alone
    with torch.no_grad():
        torch.testing.assert_close(smooth(ids).logits, ref, rtol=1e-4, atol=1e-4)
    params = effml.model_size(model)["parameters"]
    effml.quantize(model, "smoothquant", w_bits=4, a_bits=8, calib=ids)
    _check_shared(model)
    assert effml.model_size(model)["parameters"] == params
    effml.save(model, tmp_path)
    loaded = effml.load(tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    _check_shared(loaded)


@pytest.mark.parametrize("method", ["quarot", "flatquant"])
def test_transform_methods_refuse_recursive_models_before_any_work(method):
    model = _recursive("llama")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="untie the shared blocks"):
        effml.quantize(model, method, w_bits=4, calib=random_ids(model, 2, 16))
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
