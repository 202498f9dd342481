"""Model size accounting."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
import torch.nn as nn


def tensor_key(t: torch.Tensor) -> tuple:
    """Equal for two tensors exactly when they are the same view of the same memory (tied
    embeddings, recursive blocks). Meta and empty tensors have no memory: they key by object."""
    if t.device.type == "meta" or t.numel() == 0:
        return ("object", id(t))
    return (t.device.type, t.data_ptr(), t.dtype, tuple(t.shape), tuple(t.stride()))


def unique_tensors(tensors: Iterable[torch.Tensor], seen: set | None = None) -> Iterator[torch.Tensor]:
    """Each tensor of ``tensors`` once (by :func:`tensor_key`). Pass one ``seen`` set to several
    calls to count a tensor only in the first group that holds it."""
    seen = set() if seen is None else seen
    for t in tensors:
        key = tensor_key(t)
        if key not in seen:
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
    for t in unique_tensors(list(model.parameters()) + list(model.buffers())):
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
