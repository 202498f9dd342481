"""Unique parameter counts per part of a (recursive) model."""

from __future__ import annotations

import torch.nn as nn

from ..core.arch import get_arch, get_submodule
from ..core.size import unique_tensors


def parameter_report(model: nn.Module) -> dict:
    """Unique parameters (each shared tensor once) in: ``blocks`` (decoder-layer weights and norms,
    shared blocks counted once), ``lora`` (per-depth corrections), ``embeddings`` (input
    embeddings and LM head; once if tied), ``other`` (final norm etc.), plus ``non_embedding``
    (everything but embeddings) and ``total``."""
    from .lora import DepthLoRALinear

    arch = get_arch(model)
    seen: set = set()  # shared: a tensor counts in the first part that holds it

    def count(params) -> int:
        return sum(p.numel() for p in unique_tensors(params, seen))

    lora_params = [p for m in model.modules() if isinstance(m, DepthLoRALinear) for p in m.lora_parameters()]
    lora = count(lora_params)
    lora_ids = {id(p) for p in lora_params}
    embeddings = count(list(get_submodule(model, arch.embed).parameters()) + list(get_submodule(model, arch.lm_head).parameters()))
    blocks = count(p for p in get_submodule(model, arch.layers).parameters() if id(p) not in lora_ids)
    other = count(model.parameters())
    total = blocks + lora + embeddings + other
    return {"blocks": blocks, "lora": lora, "embeddings": embeddings, "other": other,
            "non_embedding": total - embeddings, "total": total}


def source_layers(model: nn.Module, n_layers: int) -> tuple[list[int], int]:
    """For each of the model's ``n_layers`` decoder layers, the index of the original model's layer
    it came from, and how many layers that original had: from the report of
    :func:`effml.recursive.recursify` or :func:`effml.recursive.drop_layers` (which compose them),
    else the identity."""
    rep = getattr(model, "effml_report", None)
    rep = rep if isinstance(rep, dict) else {}
    for kind in ("recursify", "drop_layers"):  # recursify runs after drop_layers and copies its map
        entry = rep.get(kind)
        if isinstance(entry, dict) and len(entry.get("teacher_layers", ())) == n_layers:
            return [int(i) for i in entry["teacher_layers"]], int(entry["teacher_num_layers"])
    return list(range(n_layers)), n_layers
