"""``drop_layers``: the layer-dropping baseline for a parameter budget.

Block influence (as in ShortGPT / Gromov et al., "The unreasonable ineffectiveness of the deeper
layers"): the angular distance ``arccos(cos(h_in, h_out)) / pi`` between a block's input and
output hidden state, per token, averaged over the calibration tokens. A block that barely turns
the residual stream (influence near 0) is the cheapest to remove. Influences are measured once,
on the unmodified model (one pass of the layer-wise engine, each block on its original inputs),
and the blocks are removed in increasing influence until the non-embedding parameters fit the
budget; they are not re-measured after each removal.

The dropped model stays an ordinary HF model: the kept layers are renumbered (``layer_idx`` of
every submodule, so the KV cache has one slot per kept layer), ``config.num_hidden_layers`` and
every per-layer config list (``layer_types`` of sliding/global attention, ...) are cut to the
kept layers, so ``generate()``, ``effml.save``/``effml.load`` and ``save_pretrained`` work as for any
shallower model. ``model.effml_report["drop_layers"]`` records the influences, the dropped
indices and, per kept layer, the original layer it came from (``teacher_layers``), which
:func:`effml.recursive.heal` reads to distil each kept block from the original model.
"""

from __future__ import annotations

import json
import logging
import math
import time

import torch
import torch.nn as nn

from ..core.arch import get_arch, get_submodule
from ..core.calibrate import LayerwiseEngine
from ..core.validate import check_token_ids
from .report import parameter_report, source_layers

log = logging.getLogger(__name__)


@torch.no_grad()
def block_influence(model: nn.Module, calib: torch.Tensor, device=None, batch_size: int = 1) -> list[float]:
    """Per decoder block, the mean over calibration tokens of ``arccos(cos(h_in, h_out)) / pi``
    (0: the block leaves every token's direction unchanged; 1: it reverses it). Each block sees
    the original model's own inputs (``propagate="original"``)."""
    calib = check_token_ids(calib, model, what="calib")
    out: list[float] = []

    def callback(ctx):
        total, count = 0.0, 0
        for x, y in zip(ctx.inputs, ctx.fp_outputs):
            x, y = x.double().flatten(0, -2), y.double().flatten(0, -2)
            cos = torch.nn.functional.cosine_similarity(x, y, dim=-1, eps=1e-30).clamp(-1.0, 1.0)
            total += float(torch.arccos(cos).sum()) / math.pi
            count += cos.numel()
        out.append(total / max(count, 1))
        return {"influence": out[-1]}

    LayerwiseEngine(model, calib, device=device, batch_size=batch_size).run(
        callback, propagate="original", desc="drop_layers: block influence")
    return out


def _check_budget(param_budget) -> float:
    if isinstance(param_budget, bool) or not isinstance(param_budget, (int, float)) or not 0 < param_budget < 1:
        raise ValueError(f"param_budget must be a fraction in (0, 1) of the original non-embedding parameters, got "
                         f"{param_budget!r} (1 or more would keep every layer)")
    return float(param_budget)


def per_layer_config_lists(config, n_layers: int) -> list[str]:
    """Top-level config attributes holding one entry per layer (``layer_types``, ...)."""
    names = []
    for key, value in config.to_dict().items():
        if isinstance(value, (list, tuple)) and len(value) == n_layers and isinstance(getattr(config, key, None), (list, tuple)):
            names.append(key)
    return sorted(names)


def drop_layers(model: nn.Module, param_budget: float, calib: torch.Tensor, device=None,
                batch_size: int = 1) -> nn.Module:
    """Remove, in place, the decoder blocks of smallest influence until the non-embedding
    parameters are at most ``param_budget`` x the model's; returns the model.

    ``calib``: ``[n, seq_len]`` token ids (``effml.calibration_data(tok, "wikitext2", 16, 512)``).
    The report (``model.effml_report["drop_layers"]``) gives the influence of every original
    block, the dropped and kept indices, the parameter counts before and after, and the
    student -> teacher layer map for :func:`effml.recursive.heal`.
    """
    start = time.perf_counter()
    budget_frac = _check_budget(param_budget)
    if calib is None:
        raise ValueError("drop_layers needs calibration data to measure each block's influence: pass "
                         'calib=effml.calibration_data(tokenizer, "wikitext2", 16, 512)')
    calib = check_token_ids(calib, model, what="calib")
    if getattr(model, "effml_recursive", None) is not None:
        raise ValueError("drop_layers removes whole layers, which a recursive model shares between depths: drop layers "
                         "of the original model first, then recursify")
    arch = get_arch(model)
    layers = get_submodule(model, arch.layers)
    n = len(layers)
    before = parameter_report(model)
    block_params = [sum(p.numel() for p in layer.parameters()) for layer in layers]
    budget = int(budget_frac * before["non_embedding"])
    fixed = before["non_embedding"] - sum(block_params)  # final norm etc.
    minimum = fixed + min(block_params)
    if budget < minimum:
        raise ValueError(f"param_budget={budget_frac:g} allows {budget:,} non-embedding parameters, fewer than the "
                         f"{minimum:,} of one decoder block plus the rest of the model: the minimum param_budget "
                         f"here is {minimum / before['non_embedding']:.4f}")
    if n < 2:
        raise ValueError("drop_layers needs a model with at least 2 decoder layers")

    influence = block_influence(model, calib, device=device, batch_size=batch_size)
    order = sorted(range(n), key=lambda i: (influence[i], i))
    dropped: list[int] = []
    size = before["non_embedding"]
    for i in order:
        if size <= budget or len(dropped) == n - 1:
            break
        dropped.append(i)
        size -= block_params[i]
    kept = [i for i in range(n) if i not in set(dropped)]
    if size > budget:  # pragma: no cover - only when blocks differ in size
        log.warning("drop_layers: one block is left and the model still has %d > %d non-embedding parameters",
                    size, budget)
    lists = _remove_layers(model, kept)

    prev, teacher_num_layers = source_layers(model, n)
    after = parameter_report(model)
    report = {
        "param_budget": budget_frac, "budget_params": budget, "before": before, "after": after,
        "fraction_used": after["non_embedding"] / max(before["non_embedding"], 1),
        "metric": "block influence: mean over tokens of arccos(cos(h_in, h_out)) / pi",
        "influence": [round(v, 6) for v in influence], "dropped": sorted(dropped), "drop_order": dropped,
        "kept": kept, "per_layer_config": lists,
        # layer j of the dropped model replaces layer teacher_layers[j] of the original model
        "teacher_layers": [prev[k] for k in kept], "teacher_num_layers": teacher_num_layers,
    }
    _record(model, "drop_layers", report, method="block_influence",
            config={"param_budget": budget_frac, "n_calib": int(calib.shape[0]), "seq_len": int(calib.shape[1])},
            seconds=time.perf_counter() - start)
    log.info("drop_layers: dropped %d of %d blocks %s (influence %s); non-embedding params %d -> %d (budget %d)",
             len(dropped), n, sorted(dropped), [round(influence[i], 4) for i in sorted(dropped)],
             before["non_embedding"], after["non_embedding"], budget)
    return model


def _remove_layers(model: nn.Module, kept: list[int]) -> list[str]:
    """Keep only layers ``kept`` (in order), renumber them, cut the per-layer config lists.
    Returns the names of the config lists that were cut."""
    arch = get_arch(model)
    layers = get_submodule(model, arch.layers)
    n = len(layers)
    config = model.config
    lists = per_layer_config_lists(config, n)
    new = nn.ModuleList([layers[i] for i in kept])
    for j, layer in enumerate(new):
        for m in layer.modules():
            if isinstance(getattr(m, "layer_idx", None), int):
                m.layer_idx = j
    parent_path, _, attr = arch.layers.rpartition(".")
    setattr(get_submodule(model, parent_path), attr, new)
    for key in lists:
        value = getattr(config, key)
        setattr(config, key, type(value)(value[i] for i in kept))
    config.num_hidden_layers = len(kept)
    return lists


def _record(model: nn.Module, kind: str, report: dict, *, method: str, config: dict, seconds: float) -> None:
    """``model.effml_report[kind] = report`` plus one history entry, as
    :func:`effml.core.report.add_step` writes them for the core step kinds."""
    from ..core.report import measure

    prev = getattr(model, "effml_report", None)
    out = dict(prev) if isinstance(prev, dict) else {}
    out[kind] = report
    entry = {"step": kind, "method": method, "config": config, "seconds": round(float(seconds), 2), **measure(model)}
    entry = json.loads(json.dumps(entry, default=lambda o: o.item() if hasattr(o, "item") else str(o)))
    out["steps"] = [*out.get("steps", []), entry]
    model.effml_report = out
