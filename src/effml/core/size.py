"""Model size accounting."""

from __future__ import annotations

import torch.nn as nn


def _unique_tensors(model: nn.Module):
    seen = set()
    for t in list(model.parameters()) + list(model.buffers()):
        key = (t.data_ptr(), t.numel(), t.dtype) if t.device.type != "meta" else id(t)
        if key in seen:
            continue
        seen.add(key)
        yield t


def model_size(model: nn.Module) -> dict:
    """Parameters, bytes and effective bits per weight, counting shared tensors once.

    A compressed module may report what it really stores by defining ``effml_storage()`` ->
    ``(n_weights, n_bytes)``; its own tensors are then not counted again.
    """
    params = n_bytes = 0
    compressed_ids = set()
    compressed_weights = compressed_bytes = 0
    for m in model.modules():
        if hasattr(m, "effml_storage"):
            w, b = m.effml_storage()
            compressed_weights += w
            compressed_bytes += b
            compressed_ids |= {id(t) for t in list(m.parameters()) + list(m.buffers())}
    for t in _unique_tensors(model):
        if id(t) in compressed_ids:
            continue
        n_bytes += t.numel() * t.element_size()
        if isinstance(t, nn.Parameter):
            params += t.numel()
    params += compressed_weights
    n_bytes += compressed_bytes
    return {
        "parameters": params,
        "bytes": n_bytes,
        "megabytes": n_bytes / 2**20,
        "bits_per_weight": 8 * n_bytes / max(params, 1),
    }
