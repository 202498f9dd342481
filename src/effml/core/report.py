"""``model.effml_report``: one record of everything effml did to a model, in order.

Every method (prune, quantize, recursify) ends with :func:`add_step`, which appends one entry to
``report["steps"]`` (kind, method, config, seconds, and what the model measures *after* the step:
decoder-linear sparsity, bits per weight, parameters, bytes) and keeps the method's full report
where earlier versions put it, so older readers keep working:

* ``report["prune"]`` (read by :func:`effml.prune.verify_sparsity`),
* ``report["recursify"]``,
* the quantize report's keys at the top level (``method``, ``config``, ``linear_bits_per_weight``...).

Step entries are stored JSON-normalised, so the history compares equal after ``effml.save`` /
``effml.load`` (which write the report as JSON).
"""

from __future__ import annotations

import json

import torch
import torch.nn as nn

from .size import model_size, tensor_key

STEP_KINDS = ("prune", "quantize", "recursify")
# top-level keys the report itself owns; a quantize report may not overwrite them
_RESERVED = ("steps", *STEP_KINDS)


def _holder(module: nn.Module) -> nn.Module:
    """The module that stores a decoder linear's weight: the linear itself, or the compressed
    ``base`` a wrapper routes through (a quantized recursive block under per-depth LoRA)."""
    while getattr(module, "weight", None) is None and isinstance(getattr(module, "base", None), nn.Module):
        module = module.base
    return module


def _stored_weight(module: nn.Module) -> tuple[torch.Tensor, tuple] | None:
    """The weight a decoder linear stores (dequantized if it stores integer codes) and a key that
    is equal for modules sharing that storage (recursive blocks)."""
    module = _holder(module)
    deq = getattr(module, "dequantized_weight", None)
    if callable(deq):
        qweight = getattr(module, "qweight", None)
        base = qweight if isinstance(qweight, torch.Tensor) and getattr(module, "weight", None) is None else module.weight
        return deq().detach(), tensor_key(base)
    w = getattr(module, "weight", None)
    if isinstance(w, torch.Tensor):
        return w.detach(), tensor_key(w)
    return None


def linear_stats(model: nn.Module) -> dict:
    """Sparsity and stored bits per weight of the decoder linears, each shared storage once.

    Sparsity counts exact zeros of the stored (dequantized) base weights; per-depth LoRA factors
    of a recursive model are not weights of a linear here and are not counted."""
    from .surgery import iter_linears

    seen: set = set()
    n = zeros = n_bytes = 0
    for ref in iter_linears(model):
        stored = _stored_weight(ref.module)
        if stored is None:
            continue
        w, key = stored
        if key in seen:
            continue
        seen.add(key)
        n += w.numel()
        zeros += int((w == 0).sum())
        holder = _holder(ref.module)
        storage = getattr(holder, "effml_storage", None)
        if callable(storage) and hasattr(holder, "dequantized_weight"):
            n_bytes += storage()[1]
        else:
            n_bytes += w.numel() * w.element_size()
            bias = getattr(holder, "bias", None)
            if isinstance(bias, torch.Tensor):
                n_bytes += bias.numel() * bias.element_size()
    if not n:
        return {"sparsity": None, "linear_bits_per_weight": None}
    return {"sparsity": zeros / n, "linear_bits_per_weight": round(8 * n_bytes / n, 3)}


def measure(model: nn.Module) -> dict:
    """What the history records after each step."""
    size = model_size(model)
    return {
        **linear_stats(model),
        "bits_per_weight": round(size["bits_per_weight"], 3),
        "parameters": size["parameters"],
        "bytes": size["bytes"],
    }


def _json(obj):
    return json.loads(json.dumps(obj, default=lambda o: o.item() if hasattr(o, "item") else str(o)))


def add_step(model: nn.Module, kind: str, report: dict, *, method: str, config: dict, seconds: float) -> dict:
    """Record one finished step on ``model.effml_report`` (created if absent) and return the
    history entry. ``report``: the method's own report, kept under ``kind`` (for quantize: at
    the top level, where it always was)."""
    if kind not in STEP_KINDS:
        raise ValueError(f"unknown step kind {kind!r}; one of {STEP_KINDS}")
    prev = getattr(model, "effml_report", None)
    out = dict(prev) if isinstance(prev, dict) else {}
    if kind == "quantize":
        clash = sorted(set(report) & set(_RESERVED))
        if clash:
            raise ValueError(f"a quantize report may not use the keys {clash}")  # pragma: no cover
        out.update(report)
    else:
        out[kind] = report
    entry = _json({"step": kind, "method": method, "config": config, "seconds": round(float(seconds), 2),
                   **measure(model)})
    out["steps"] = [*out.get("steps", []), entry]
    model.effml_report = out
    return entry


def history(model: nn.Module) -> list[dict]:
    """The steps recorded on ``model`` (empty for an untouched model)."""
    rep = getattr(model, "effml_report", None)
    return list(rep.get("steps", [])) if isinstance(rep, dict) else []


def update_last_step(model: nn.Module, kind: str, *, config: dict | None = None, seconds: float | None = None) -> dict:
    """Re-measure the last history entry when a method finishes its step in a second call
    (FlatQuant's ``finish_weights`` quantizes weights it had left float), so the history never
    keeps the unfinished numbers. Raises if the last step is not a ``kind`` step."""
    steps = history(model)
    if not steps or steps[-1]["step"] != kind:
        raise ValueError(f"the model's last recorded step is not a {kind} step")
    entry = dict(steps[-1])
    if config is not None:
        entry["config"] = config
    if seconds is not None:
        entry["seconds"] = round(float(seconds), 2)
    entry = _json({**entry, **measure(model)})
    model.effml_report["steps"] = [*steps[:-1], entry]
    return entry
