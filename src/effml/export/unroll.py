"""``format="hf-unrolled"``: a recursive model as an ordinary checkpoint of its original family.

Every depth already has its own decoder-layer module; only the weights are shared. Unrolling
writes each depth's effective weights: the shared weight plus that depth's merged LoRA
(``W + B A`` on the role's output rows, bias plus its per-depth correction), so any HF tool loads
it. The cost is disk: shared blocks are stored once per depth (reported).
"""

from __future__ import annotations

import torch
import torch.nn as nn


@torch.no_grad()
def merged_weight(m: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A DepthLoRALinear's effective (weight, bias), merged in float64."""
    w = m.weight.detach().double().clone()
    b = None if m.bias is None else m.bias.detach().double().clone()
    for role, (lo, hi) in m.roles.items():
        if role in m.ranks:
            w[lo:hi] += m.lora_B[role].double() @ m.lora_A[role].double()
        if role in m.lora_bias:
            b[lo:hi] += m.lora_bias[role].double()
    return w.to(m.weight.dtype), None if b is None else b.to(m.bias.dtype)


def unrolled_tensors(model: nn.Module, dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors named as the original family names them, size report)."""
    from ..core.size import tensor_key
    from ..recursive.lora import DepthLoRALinear

    if getattr(model, "effml_recursive", None) is None:
        raise ValueError("format='hf-unrolled' is for recursive models (effml.recursify); this model is not "
                         "recursive: use format='compressed-tensors'")
    for name, m in model.named_modules():
        if type(m).__name__ in ("QuantLinear", "AttentionQuant"):
            raise ValueError(f"{name} is quantized: unroll the recursive model before quantizing it (export "
                             "hf-unrolled, load that folder, quantize, export compressed-tensors)")
    loras = {n: m for n, m in model.named_modules() if isinstance(m, DepthLoRALinear)}
    tensors: dict[str, torch.Tensor] = {}
    stored: dict[tuple, int] = {}
    for key, t in model.state_dict().items():
        owner, _, attr = key.rpartition(".")
        if owner in loras or any(key.startswith(f"{n}.") for n in loras):
            continue
        stored.setdefault(tensor_key(t), t.numel())
        tensors[key] = t.detach().cpu().to(dtype) if t.is_floating_point() else t.detach().cpu()
    for name, m in loras.items():
        w, b = merged_weight(m)
        for p in [m.weight, m.bias, *m.lora_parameters()]:
            if p is not None:
                stored.setdefault(tensor_key(p), p.numel())
        tensors[f"{name}.weight"] = w.cpu().to(dtype)
        if b is not None:
            tensors[f"{name}.bias"] = b.cpu().to(dtype)
    if getattr(model.config, "tie_word_embeddings", False):
        tensors.pop("lm_head.weight", None)
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    unrolled = sum(t.numel() for t in tensors.values())
    recursive = sum(stored.values())  # shared tensors once, LoRA factors included
    report = {"recursive_parameters": recursive, "unrolled_parameters": unrolled,
              "size_cost": round(unrolled / max(recursive, 1), 3)}
    return tensors, report
