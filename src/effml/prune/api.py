"""``effml.prune(model, sparsity, ...)``: allocate per-layer sparsity, then prune every decoder
linear with magnitude, Wanda or SparseGPT through the core layer-by-layer engine."""

from __future__ import annotations

import logging
import time

import numpy as np
import torch
import torch.nn as nn

from ..core.calibrate import LayerwiseEngine
from .allocation import AUTO_EPSILON, alpha_allocation, nm_allocation, owl_allocation, uniform_allocation, weighted_mean
from .auto_epsilon import select_epsilon
from .config import PruneConfig
from .esd import esd
from .masks import check_nm_shape, magnitude_mask, wanda_mask
from .owl import layer_outlier_ratios
from .sparsegpt import sparsegpt_prune
from .stats import Hessians, InputSqNorms, block_units, collect
from .units import Unit, check_not_lower, check_prunable, prunable_units

log = logging.getLogger(__name__)


def _alpha_ratios(model, units: list[Unit], cfg: PruneConfig):
    """AlphaPruning's metric per unit and ``ratios(epsilon)``: per-unit target ratios at that range."""
    rec = esd(model, metric=cfg.metric, xmin=cfg.xmin, compat=cfg.compat, keep_eigenvalues=False)
    if [r.name for r in rec] != [u.name for u in units]:
        raise RuntimeError("ESD records do not line up with the prunable matrices")  # pragma: no cover
    sizes = np.array([u.numel for u in units], dtype=np.float64)
    ceiling = cfg.ceiling if cfg.nm is None else (cfg.nm[1] - 1) / cfg.nm[1]
    if cfg.granularity == "block":
        means = rec.per_block()
        blocks = sorted({u.block for u in units})
        q = np.array([means[b] for b in blocks])
        gsizes = np.array([sizes[[u.block == b for u in units]].sum() for b in blocks])
        group = np.array([blocks.index(u.block) for u in units])
        metric_vals = [means[u.block] for u in units]
    else:
        q, gsizes, group = rec.values(), sizes, np.arange(len(units))
        metric_vals = [float(v) for v in q]

    def ratios(epsilon: float) -> np.ndarray:
        return alpha_allocation(q, gsizes, cfg.sparsity, epsilon, ceiling)[group]

    return ratios, metric_vals


def _round_nm(ratios: np.ndarray, units: list[Unit], cfg: PruneConfig):
    """(ratios, N per unit) for an N:M pattern, else (ratios, None)."""
    if cfg.nm is None:
        return ratios, None
    n, m = cfg.nm
    sizes = np.array([u.numel for u in units], dtype=np.float64)
    blocks = sorted({u.block for u in units})
    if cfg.allocation == "uniform":
        ns = np.full(len(units), n)
    elif cfg.granularity == "block":
        # round per block so each block keeps one pattern
        bratio = np.array([ratios[[u.block == b for u in units]][0] for b in blocks])
        bsizes = np.array([sizes[[u.block == b for u in units]].sum() for b in blocks])
        bn = nm_allocation(bratio, bsizes, m, n)
        ns = np.array([bn[blocks.index(u.block)] for u in units])
    else:
        ns = nm_allocation(ratios, sizes, m, n)
    return ns / m, ns


def _allocate(model, units: list[Unit], cfg: PruneConfig, engine: LayerwiseEngine | None,
              calib: torch.Tensor | None = None, device=None, batch_size: int = 1):
    """Per-unit target ratios (and N per unit for N:M), the metric value per unit, the epsilon
    used (alpha only) and the epsilon="auto" report (None unless auto)."""
    sizes = np.array([u.numel for u in units], dtype=np.float64)
    blocks = sorted({u.block for u in units})
    metric_vals: list[float | None] = [None] * len(units)
    epsilon, auto = None, None
    if cfg.allocation == "uniform":
        ratios = uniform_allocation(sizes, cfg.sparsity)
    elif cfg.allocation == "alpha":
        alpha_ratios, metric_vals = _alpha_ratios(model, units, cfg)
        epsilon = cfg.epsilon
        if cfg.auto_epsilon:
            if cfg.sparsity == 0:
                epsilon = 0.0  # nothing to prune, nothing to rank
            else:
                epsilon, auto = select_epsilon(
                    model, units, lambda e: _round_nm(alpha_ratios(e), units, cfg), cfg.epsilon_candidates,
                    calib, m=None if cfg.nm is None else cfg.nm[1], device=device, batch_size=batch_size)
        ratios = alpha_ratios(epsilon)
    else:  # owl
        lod = layer_outlier_ratios(engine, units, cfg.owl_m)
        per = owl_allocation(lod, cfg.sparsity, cfg.owl_lambda)
        ratios = np.array([per[blocks.index(u.block)] for u in units])
        metric_vals = [lod[blocks.index(u.block)] for u in units]
    ratios, ns = _round_nm(ratios, units, cfg)
    return ratios, ns, metric_vals, epsilon, auto


def _prune_unit_magnitude(u: Unit, ratio: float, nm):
    w = u.weight
    mask = magnitude_mask(w, ratio, nm)
    u.set_weight(w.masked_fill(mask, 0))


def prune_model(model: nn.Module, cfg: PruneConfig, calib: torch.Tensor | None = None, device=None, batch_size: int = 1):
    """Prune ``model`` in place per ``cfg``; returns the report dict (also set on the model)."""
    start = time.perf_counter()
    check_prunable(model)
    units = prunable_units(model)
    if not units:
        raise ValueError("the model has no decoder linears to prune")
    check_not_lower(units, cfg.sparsity)
    if cfg.nm is not None:
        for u in units:
            check_nm_shape(u.shape[1], cfg.nm[1], u.name)
    engine = None
    if cfg.needs_data:
        if calib is None:
            why = (" (epsilon='auto' picks the allocation range on it; a fixed epsilon, e.g. 0.3, keeps magnitude "
                   "pruning data-free)") if cfg.method == "magnitude" and cfg.auto_epsilon else ""
            raise ValueError(
                f"method={cfg.method!r} with allocation={cfg.allocation!r} needs calibration data{why}: pass "
                "calib=effml.calibration_data(tokenizer, 'wikitext2', n_samples=32, seq_len=512)"
            )
        from ..core.validate import check_token_ids

        calib = check_token_ids(calib, model, what="calib")
        engine = LayerwiseEngine(model, calib, device=device, batch_size=batch_size)
    ratios, ns, metric_vals, epsilon, auto = _allocate(model, units, cfg, engine, calib, device, batch_size)
    nm_of = (lambda i: (int(ns[i]), cfg.nm[1])) if ns is not None else (lambda i: None)
    index = {id(u): i for i, u in enumerate(units)}

    if cfg.method == "magnitude":
        for i, u in enumerate(units):
            _prune_unit_magnitude(u, float(ratios[i]), nm_of(i))
    else:
        def callback(ctx):
            mine = block_units(units, ctx.index)
            collector = InputSqNorms() if cfg.method == "wanda" else Hessians()
            collect(ctx, mine, collector)
            for u in mine:
                i = index[id(u)]
                nm = nm_of(i)
                if nm is not None and nm[0] == 0:
                    continue  # N = 0: this layer keeps every weight
                w = u.weight
                if cfg.method == "wanda":
                    new = w.masked_fill(wanda_mask(w, collector.sq[u.ref.path], float(ratios[i]), nm), 0)
                else:
                    new = sparsegpt_prune(w, collector.H(u.ref.path), float(ratios[i]), nm, cfg.blocksize, cfg.damping,
                                          grid=u.grid())
                u.set_weight(new)
            z = sum(u.zeros() for u in mine)
            return {"target": float(np.mean([ratios[index[id(u)]] for u in mine])),
                    "achieved": z / sum(u.numel for u in mine)}

        engine.run(callback, propagate="compressed", desc=f"{cfg.method} pruning")
    report = _report(units, cfg, ratios, ns, metric_vals, time.perf_counter() - start, calib)
    report["epsilon"] = epsilon  # the range used (alpha allocation), chosen when cfg.epsilon is "auto"
    if auto is not None:
        report["auto_epsilon"] = auto
    from ..core.report import add_step  # history entry; keeps report["prune"] for verify_sparsity

    add_step(model, "prune", report, method=cfg.method, config=report["config"], seconds=report["seconds"])
    log.info("pruned to %.4f sparsity (target %.4f) in %.1fs", report["achieved_sparsity"], cfg.sparsity, report["seconds"])
    return report


def _report(units, cfg, ratios, ns, metric_vals, seconds, calib) -> dict:
    layers = []
    for i, u in enumerate(units):
        z = u.zeros()
        layers.append({
            "name": u.name, "block": u.block, "role": u.role, "shape": list(u.shape),
            "metric": metric_vals[i], "target": float(ratios[i]), "n": None if ns is None else int(ns[i]),
            "zeros": z, "achieved": z / u.numel,
        })
    sizes = [u.numel for u in units]
    return {
        "config": cfg.to_dict(),
        "target_sparsity": cfg.sparsity,
        "allocated_mean": weighted_mean(ratios, sizes),
        "achieved_sparsity": sum(layer["zeros"] for layer in layers) / sum(sizes),
        "calibration": None if calib is None else list(calib.shape),
        "seconds": round(seconds, 2),
        "layers": layers,
    }


def prune(
    model: nn.Module,
    sparsity: float | None,
    method: str = "wanda",
    allocation: str = "alpha",
    epsilon: float | str = AUTO_EPSILON,
    pattern: str | None = None,
    calib: torch.Tensor | None = None,
    metric: str = "alpha_hill",
    *,
    device=None,
    batch_size: int = 1,
    **options,
) -> nn.Module:
    """Prune the decoder linears of ``model`` in place and return it.

    ``method``: ``"magnitude"`` (data-free), ``"wanda"`` or ``"sparsegpt"``. ``allocation``:
    ``"uniform"``, ``"alpha"`` (AlphaPruning: ESD power-law alpha, range ``epsilon``) or
    ``"owl"``. ``epsilon``: a number in [0, 1) is the paper's fixed range (0.3 its default,
    reproduced exactly); ``"auto"`` (default, effml's addition) scores the candidates
    ``epsilon_candidates`` (0.0 = uniform, 0.1, ..., 0.4) by the held-back calibration NLL of a
    one-shot Wanda proxy and keeps the best (ties: the smaller), so alpha allocation is never
    worse than uniform on that proxy; the same proxy serves every ``method``, and it needs
    ``calib`` even for magnitude pruning (see :mod:`effml.prune.auto_epsilon`). ``pattern``: None (unstructured) or ``"N:M"`` (mixed N per layer for alpha/owl).
    ``calib``: [n, seq_len] token ids, needed by Wanda, SparseGPT and OWL. Further options are
    :class:`PruneConfig` fields (``xmin``, ``granularity``, ``owl_m``, ``damping``, ...).
    The report (per-layer target / achieved sparsity and metric, the epsilon used and, for
    ``"auto"``, the candidates with their proxy losses) is ``model.effml_report["prune"]``.
    """
    unknown = set(options) - set(PruneConfig.__dataclass_fields__)
    if unknown:
        raise ValueError(f"unknown prune options {sorted(unknown)}; allowed: {sorted(PruneConfig.__dataclass_fields__)}")
    cfg = PruneConfig(sparsity=sparsity, method=method, allocation=allocation, epsilon=epsilon, pattern=pattern,
                      metric=metric, **options)
    with torch.no_grad():
        prune_model(model, cfg, calib=calib, device=device, batch_size=batch_size)
    return model


def verify_sparsity(model: nn.Module) -> dict:
    """Check every linear still has the zeros its prune report recorded (e.g. after
    ``effml.load``): exactly them, or at least them once a later step (quantization) ran;
    raises ValueError on a mismatch, returns {name: achieved}."""
    report = (getattr(model, "effml_report", None) or {}).get("prune")
    if not report:
        raise ValueError("the model has no prune report (model.effml_report['prune']): it was not pruned by effml")
    from ..core.report import history

    # exactly the recorded zeros while pruning was the last step; a later step (quantization) may
    # round a few kept weights to exactly 0, so after one, at least them
    kinds = [s["step"] for s in history(model)]
    later = "prune" in kinds and kinds[-1] != "prune"
    units = {u.name: u for u in prunable_units(model)}
    out = {}
    for layer in report["layers"]:
        u = units.get(layer["name"])
        if u is None:
            raise ValueError(f"{layer['name']} from the prune report is not in the model")
        z = u.zeros()
        if z < layer["zeros"] or (z != layer["zeros"] and not later):
            raise ValueError(f"{layer['name']}: {z} zeros, the prune report recorded {layer['zeros']}")
        out[layer["name"]] = z / u.numel
    return out
