"""Shared checks: load an export with transformers (the real client) and compare with effml."""

from __future__ import annotations

import torch

CT_PARAMS = {"weight_scale", "weight_shape", "weight_zero_point", "weight_packed", "weight_g_idx",
             "input_scale", "input_zero_point", "weight_global_scale"}


def effective_state(model) -> dict[str, torch.Tensor]:
    """effml's model as plain tensors: quantized linears dequantized, effml-only modules left out."""
    out = {}
    for key, t in model.state_dict().items():
        # online transforms are compared on their own (max_transform_diff)
        if ".effml_kv." in key or ".input_transform." in key:
            continue
        out[key] = t
    for name, m in model.named_modules():
        if hasattr(m, "dequantized_weight"):
            for k in [k for k in out if k.startswith(f"{name}.") and k.count(".") == name.count(".") + 1]:
                del out[k]
            out[f"{name}.weight"] = m.dequantized_weight()
            if m.bias is not None:
                out[f"{name}.bias"] = m.bias
    return out


def load_hf(path, **kwargs):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager", **kwargs).eval()


def max_weight_diff(hf, model, ids) -> float:
    """Largest |difference| over every tensor (after a forward pass: compressed-tensors
    decompresses on the first one). Names must match one to one."""
    with torch.no_grad():
        hf(ids[:1, :4])
    ours = {k: v.detach() for k, v in effective_state(model).items()}
    # compressed-tensors keeps its quantization parameters next to the decompressed weight
    transforms = set(transform_modules(hf))
    theirs = {k: v for k, v in hf.state_dict().items()
              if k.rpartition(".")[2] not in CT_PARAMS and k.rpartition(".")[0] not in transforms}
    if getattr(hf.config, "tie_word_embeddings", False):
        theirs.pop("lm_head.weight", None)
        ours.pop("lm_head.weight", None)
    assert sorted(ours) == sorted(theirs), (sorted(set(ours) ^ set(theirs)))[:8]
    return max(float((ours[k].float() - theirs[k].float()).abs().max()) for k in ours)


def reference_logits(model, ids) -> torch.Tensor:
    """effml's logits on its torch reference path (dequantized weights in fp32), not the CPU
    integer kernels, whose bf16 / int8 rounding is not what transformers computes."""
    from effml.kernels import use_kernels

    with torch.no_grad(), use_kernels("torch"):
        return model(ids).logits.float()


def rel_logit_diff(hf, model, ids) -> float:
    a = reference_logits(model, ids)
    with torch.no_grad():
        b = hf(ids).logits.float()
    return float((a - b).abs().max() / a.abs().max())


def transform_modules(hf) -> dict:
    """name -> compressed-tensors transform module (``{linear}.{group}_input``) of a loaded model."""
    from compressed_tensors.transform.factory.base import TransformBase

    return {n: m for n, m in hf.named_modules() if isinstance(m, TransformBase)}


def max_transform_diff(hf, model) -> float:
    """Largest |difference| between each effml linear's online transform (as the dense ``T`` of
    ``x -> x @ T``) and the one compressed-tensors applies to the same linear (its stored weight
    over sqrt(n)); every transformed linear must have exactly one, and no other linear any."""
    from effml.quant.qlinear import QuantLinear

    theirs = {}
    for name, m in transform_modules(hf).items():
        linear = name.rpartition(".")[0]
        assert linear not in theirs, f"{linear} has two transforms"
        theirs[linear] = m.weight.detach().double() / m.weight.shape[0] ** 0.5
    ours = {n: m.input_transform.dense() for n, m in model.named_modules()
            if isinstance(m, QuantLinear) and m.input_transform is not None}
    assert sorted(ours) == sorted(theirs), sorted(set(ours) ^ set(theirs))[:8]
    return max(float((ours[k] - theirs[k]).abs().max()) for k in ours)
