"""``recursify``: tie an L-layer decoder into K shared blocks and relax each depth with a LoRA.

Every depth keeps its own decoder-layer module (so its ``layer_idx``, KV-cache slot and
attention type stay), but the modules of a group hold the *same* ``nn.Parameter`` objects.
"""

from __future__ import annotations

import functools
import logging
import time
import warnings
from collections.abc import Iterable

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ..core.arch import ROLES, ArchSpec, get_arch, get_submodule
from ..core.io import record_transform, register_model_transform
from ..core.surgery import set_submodule
from .activations import input_grams
from .budget import greedy_ranks, whitened_energies, whitened_output_energy
from .config import RecursiveConfig
from .lora import DepthLoRALinear
from .report import parameter_report, source_layers
from .sharing import init_sources, share_groups

log = logging.getLogger(__name__)


NO_CALIB_WARNING = (
    "recursify: LoRA without calibration data, so it is initialised from a plain SVD of the weight residual "
    "(lora_init='svd'), which spends its rank on weight energy rather than on the outputs and loses quality "
    "(badly on models with massive activations). Pass calibration token ids for the activation-aware init, "
    'e.g. calib=effml.calibration_data(tok, "wikitext2", 16, 512), or pass lora_init="svd" to choose the '
    "plain SVD explicitly"
)


def recursify(
    model: nn.Module,
    num_loops: int = 2,
    strategy: str = "cycle",
    init: str = "stepwise",
    lora_rank=0,
    lora_init: str | None = None,
    lora_targets: Iterable[str] = ROLES,
    tie_norms: bool | str = True,
    seed: int = 0,
    calib: torch.Tensor | None = None,
    calib_batch_size: int = 1,
    grams: list[dict[str, torch.Tensor]] | None = None,
    param_budget: float | None = None,
    budget_metric: str = "relative",
) -> nn.Module:
    """Convert ``model`` in place into a (relaxed) recursive transformer and return it.

    See :class:`RecursiveConfig` for the arguments. ``model.effml_report["recursify"]`` holds the
    parameter counts before and after, and any rank that was capped at min(in, out).
    ``calib`` (token ids ``[n, seq]``) feeds the activation-aware LoRA init (``lora_init="asvd"``),
    which weights the residual by the original model's inputs on it (see :mod:`.activations`);
    ``grams`` instead passes those statistics precomputed by :func:`effml.recursive.input_grams`
    on this same (unconverted) model, so several conversions of one model pay for them once.

    ``lora_init=None`` (default) is "auto": ``"asvd"`` when ``calib`` or ``grams`` is given, else
    ``"svd"`` with a warning that quality needs calibration data.

    ``param_budget`` (a fraction in (0, 1) of the original non-embedding parameters) chooses the
    ranks itself, per depth and target: the tied base costs what it costs and the rest is spent
    greedily on rank-1 components by activation-weighted residual energy per parameter (see
    :mod:`.budget`); it needs ``calib`` (or ``grams``). ``budget_metric="relative"`` (default)
    measures each (depth, target)'s energy as a fraction of that linear's own output energy
    E||W_orig x||², ``"absolute"`` in raw output units (which starves the linears with small
    inputs, o_proj and down_proj, of rank). The allocation is reported under
    ``model.effml_report["recursify"]["allocation"]``.
    """
    start = time.perf_counter()
    has_data = calib is not None or grams is not None
    cfg = RecursiveConfig(num_loops, strategy, init, lora_rank, lora_init, tuple(lora_targets), tie_norms, seed,
                          param_budget, budget_metric)
    auto_init = cfg.lora_init is None
    if auto_init:
        cfg.lora_init = "asvd" if has_data and cfg.relaxed else "svd"
    arch = get_arch(model)
    if getattr(model, "effml_recursive", None) is not None:
        raise ValueError("this model is already recursive; recursify the original model instead")
    layers = get_submodule(model, arch.layers)
    groups = share_groups(len(layers), cfg.num_loops, cfg.strategy)  # bad num_loops fails before any work
    if cfg.depth_ranks is not None and len(cfg.depth_ranks) != len(layers):
        raise ValueError(f"lora_rank as a list needs one entry per depth: the model has {len(layers)} layers, "
                         f"got {len(cfg.depth_ranks)} entries")
    before = parameter_report(model)
    tied = tied_parameter_names(layers[0], arch, cfg.tie_norms)
    budget = None
    if cfg.param_budget is not None:
        if not has_data:
            raise ValueError("param_budget needs calibration data: the ranks go where they recover the most of the "
                             "original layers' outputs, measured on activations. Pass calib=effml.calibration_data("
                             'tokenizer, "wikitext2", 16, 512) (or grams=effml.recursive.input_grams(model, calib))')
        budget = int(cfg.param_budget * before["non_embedding"])
        shared_cost = before["non_embedding"] - sum(
            layers[d].get_parameter(name).numel() for g in groups for d in g[1:] for name in tied)
        if budget < shared_cost:
            minimum = shared_cost / before["non_embedding"]
            raise ValueError(
                f"param_budget={cfg.param_budget:g} allows {budget:,} non-embedding parameters, fewer than the "
                f"{shared_cost:,} of the strictly shared model (num_loops={cfg.num_loops}, strategy={cfg.strategy!r}, "
                f"tie_norms={cfg.tie_norms!r}) without any LoRA: the minimum param_budget here is {minimum:.4f}; "
                "raise it, or share more (a larger num_loops)")
    elif auto_init and cfg.relaxed and not has_data and not _all_full(cfg):
        log.warning(NO_CALIB_WARNING)
        warnings.warn(NO_CALIB_WARNING, UserWarning, stacklevel=2)
    need_grams = cfg.relaxed and (cfg.lora_init == "asvd" or cfg.param_budget is not None)
    if not need_grams:
        grams = None
    elif grams is not None:
        if len(grams) != len(layers) or any(set(g) != set(arch.linear_paths()) for g in grams):
            raise ValueError(f"grams must hold one dict per layer ({len(layers)}) keyed by {arch.linear_paths()}: "
                             "compute them with effml.recursive.input_grams(model, calib) on the original model")
    else:
        if calib is None:
            raise ValueError('lora_init="asvd" needs calibration data: pass calib=effml.calibration_data(tokenizer, '
                             'n_samples=..., seq_len=...) (or grams=effml.recursive.input_grams(model, calib)), '
                             'or use lora_init="svd"')
        grams = input_grams(model, calib, device=next(model.parameters()).device, batch_size=calib_batch_size)
    originals = [{n: p.detach().clone() for n, p in layer.named_parameters()} for layer in layers]

    sources = init_sources(groups, cfg.init)
    for group, src in zip(groups, sources):
        shared = {}
        for name in tied:
            p0 = layers[group[0]].get_parameter(name)
            value = torch.stack([originals[s][name].float() for s in src]).mean(0).to(p0.dtype)
            shared[name] = nn.Parameter(value, requires_grad=p0.requires_grad)
        for d in group:
            for name, p in shared.items():
                _set_parameter(layers[d], name, p)

    allocation = None
    if cfg.param_budget is not None:
        base = parameter_report(model)["non_embedding"]
        depth_ranks, allocation = _allocate(model, arch, layers, originals, cfg, grams, budget - base)
        allocation = {"param_budget": cfg.param_budget, "budget_params": budget, "shared_params": base,
                      "original_params": before["non_embedding"], **allocation}
        allocation["params_used"] = base + allocation["lora_params"]
        allocation["fraction_used"] = allocation["params_used"] / max(before["non_embedding"], 1)
    else:
        depth_ranks = [cfg.ranks_of_depth(d) for d in range(len(layers))]
    caps, inits, kept = _relax(model, arch, layers, originals, cfg, grams, depth_ranks)
    layout = {"groups": groups, "tied_params": tied}
    _attach(model, layout, cfg.to_dict())
    record_transform(model, "recursify", layout=layout, config=cfg.to_dict())

    after = parameter_report(model)
    teacher_layers, teacher_num_layers = source_layers(model, len(layers))
    report = {
        "config": cfg.to_dict(), "groups": groups, "init_layers": sources, "before": before, "after": after,
        "non_embedding_reduction": 1 - after["non_embedding"] / max(before["non_embedding"], 1),
        "rank_caps": caps, "lora_inits": inits,
        # per depth: mean over targets of the fraction of ||W_orig - W_shared|| the SVD LoRA keeps
        "lora_residual_kept": [round(k, 4) for k in kept],
        # depth d replaces layer teacher_layers[d] of the original model (for effml.recursive.heal)
        "teacher_layers": teacher_layers, "teacher_num_layers": teacher_num_layers,
    }
    if allocation is not None:
        report["allocation"] = allocation
        if allocation["params_used"] != after["non_embedding"]:  # pragma: no cover - the costs mirror the modules
            log.warning("param_budget: allocated %d parameters but the model has %d", allocation["params_used"],
                        after["non_embedding"])
        log.info("param_budget %.3f: %d of %d non-embedding parameters (shared base %d, LoRA %d)",
                 cfg.param_budget, allocation["params_used"], budget, allocation["shared_params"],
                 allocation["lora_params"])
    from ..core.report import add_step

    add_step(model, "recursify", report, method="recursify", config=report["config"],
             seconds=time.perf_counter() - start)
    log.info(
        "recursified %d layers into %d blocks x %d loops (%s, %s init, rank %s): non-embedding params %d -> %d (-%.1f%%)",
        len(layers), len(groups), cfg.num_loops, cfg.strategy, cfg.init,
        "by budget" if allocation is not None else cfg.lora_rank,
        before["non_embedding"], after["non_embedding"], 100 * report["non_embedding_reduction"],
    )
    for c in caps:
        log.warning("LoRA rank capped: %s", c)
    return model


def _all_full(cfg: RecursiveConfig) -> bool:
    """Every LoRA asked for is full rank (exact whatever the init: no calibration needed)."""
    every = cfg.depth_ranks if cfg.depth_ranks is not None else [cfg.ranks]
    return all(r in ("full", 0) for ranks in every for r in ranks.values())


def tied_parameter_names(block: nn.Module, arch: ArchSpec, tie_norms: bool | str) -> list[str]:
    """Names (inside a block) of the parameters that a group shares.

    Everything is tied except norms kept per depth: all norms when ``tie_norms=False``; with
    ``"foldable"`` the norms that feed no projection (Gemma's output norms, q/k norms)."""
    norm_paths = {spec.path: spec for spec in arch.norms.values()}
    names = []
    for name, _ in block.named_parameters():
        path = name.rpartition(".")[0]
        spec = norm_paths.get(path)
        if spec is not None and (tie_norms is False or (tie_norms == "foldable" and not spec.feeds)):
            continue
        names.append(name)
    return names


def _set_parameter(block: nn.Module, name: str, param: nn.Parameter) -> None:
    path, _, attr = name.rpartition(".")
    setattr(get_submodule(block, path), attr, param)


def _rows(sl: slice, n: int) -> tuple[int, int]:
    start, stop, _ = sl.indices(n)
    return start, stop


def _target_roles(model, arch: ArchSpec, path: str, out_f: int) -> dict[str, tuple[int, int]]:
    return {r: _rows(sl, out_f) for r, sl in arch.role_slices(path, model.config).items()}


def _depth_gram(grams, d: int, path: str, ratio: torch.Tensor | None) -> torch.Tensor | None:
    """E[x xᵀ] of the inputs the *converted* linear sees at depth ``d``: the original inputs,
    rescaled per channel when a shared norm replaced the original one (x_shared = x_orig / ratio)."""
    if grams is None:
        return None
    gram = grams[d][path]
    if ratio is not None:
        inv = torch.where(ratio == 0, torch.ones_like(ratio), 1 / torch.where(ratio == 0, 1.0, ratio))
        gram = gram * inv[:, None] * inv[None, :]
    return gram


def _allocate(model, arch: ArchSpec, layers, originals, cfg: RecursiveConfig, grams, lora_budget: int):
    """Ranks per depth and target for ``param_budget`` (see :mod:`.budget`): whitened residual
    energies of every (depth, target), then the greedy spend of ``lora_budget`` parameters."""
    energies, costs, total = {}, {}, {}
    bar = tqdm(layers, desc="recursify: budget spectra", unit="depth", leave=False)
    for d, layer in enumerate(bar):
        for path in arch.linear_paths():
            lin = get_submodule(layer, path)
            out_f, in_f = lin.weight.shape
            for role, (a, b) in _target_roles(model, arch, path, out_f).items():
                if role not in cfg.lora_targets:
                    continue
                residual, _, ratio = _residual(layer, arch, originals[d], path, role, (a, b), lin, model.config)
                gram = _depth_gram(grams, d, path, ratio)
                e = whitened_energies(residual, gram, max_rank=min(in_f, b - a))
                if cfg.budget_metric == "relative":  # as a fraction of this linear's own output energy
                    signal = whitened_output_energy(lin.weight.detach()[a:b].double() + residual.double(), gram)
                    e = [x / signal if signal > 0 else 0.0 for x in e]
                key = (d, role)
                energies[key] = e
                total[key] = sum(e)
                rows = b - a
                costs[key] = (in_f + rows + (rows if lin.bias is not None else 0), in_f + rows)
    ranks, used = greedy_ranks(energies, costs, max(lora_budget, 0))
    depth_ranks = [{r: 0 for r in cfg.lora_targets} for _ in layers]
    for (d, role), k in ranks.items():
        depth_ranks[d][role] = k
    kept = []
    for d in range(len(layers)):
        keys = [k for k in energies if k[0] == d]
        all_e = sum(total[k] for k in keys)
        got = sum(sum(energies[k][:ranks[k]]) for k in keys)
        kept.append(round(got / all_e, 4) if all_e > 0 else 1.0)
    by_target = {r: sum(k for (_, role), k in ranks.items() if role == r) for r in cfg.lora_targets}
    return depth_ranks, {
        "lora_budget": max(lora_budget, 0), "lora_params": used, "ranks": depth_ranks,
        "rank_totals": by_target,  # per target: the sum of its ranks over the depths
        # per depth: fraction of the activation-weighted residual energy the chosen ranks recover
        "energy_kept": kept,
        "metric": cfg.budget_metric,
    }


def _relax(model, arch: ArchSpec, layers, originals, cfg: RecursiveConfig, grams,
           depth_ranks: list[dict]) -> tuple[list[str], dict, list[float]]:
    """Wrap each target linear of every depth in a :class:`DepthLoRALinear` initialised from the
    residual between the original weight (with any tied-norm change folded in) and the shared one.
    ``depth_ranks``: per depth, role -> rank (int or "full"). ``grams`` (per depth, per path:
    E[x xᵀ] of the original inputs) switches to the activation-aware init."""
    if not cfg.relaxed:
        return [], {}, []
    gen = torch.Generator().manual_seed(cfg.seed)
    caps: set[str] = set()
    inits: dict[str, int] = {}
    kept: list[float] = []
    grams = grams if cfg.lora_init == "asvd" else None
    bar = tqdm(layers, desc="recursify: LoRA init", unit="depth", leave=False)
    for d, layer in enumerate(bar):
        fractions = []
        for path in arch.linear_paths():
            lin = get_submodule(layer, path)
            out_f, in_f = lin.weight.shape
            roles = _target_roles(model, arch, path, out_f)
            ranks = {}
            for role, (a, b) in roles.items():
                want = depth_ranks[d].get(role, 0)
                cap = min(in_f, b - a)
                if want == "full":
                    want = cap
                elif want > cap:
                    caps.add(f"{role}: rank {want} > min(in={in_f}, out={b - a}), using {cap}")
                    want = cap
                if want > 0:
                    ranks[role] = want
            if not ranks:
                continue
            bias_delta = tuple(ranks) if lin.bias is not None else ()
            new = DepthLoRALinear(lin.weight, lin.bias, roles, ranks, bias_delta)
            for role in ranks:
                a, b = roles[role]
                if cfg.lora_init == "zero":
                    new.standard_init(role, gen)
                    kind = "standard"
                else:
                    residual, bias_res, ratio = _residual(layer, arch, originals[d], path, role, (a, b), lin, model.config)
                    kind, frac = new.init_from_residual(role, residual, bias_res, gen,
                                                        gram=_depth_gram(grams, d, path, ratio))
                    fractions.append(frac)
                inits[kind] = inits.get(kind, 0) + 1
            set_submodule(layer, path, new)
        if fractions:
            kept.append(sum(fractions) / len(fractions))
            bar.set_postfix(depth=d, residual_kept=f"{kept[-1]:.3f}")
            log.debug("depth %d: LoRA reproduces %.3f of the residual norm (mean over targets)", d, kept[-1])
    return sorted(caps), inits, kept


@torch.no_grad()
def _residual(layer, arch: ArchSpec, original: dict, path: str, role: str, rows, lin, config):
    """W_orig * (g_orig / g_shared) - W_shared for the role's rows, the bias difference, and the
    column ratio g_orig / g_shared (None when the norm did not change)."""
    a, b = rows
    w_orig = original[f"{path}.weight"][a:b].float()
    ratio = None
    norm = arch.norm_feeding(role)
    if norm is not None:
        g_orig = original[f"{norm.path}.weight"].float() + arch.norm_offset
        g_now = get_submodule(layer, norm.path).weight.detach().float() + arch.norm_offset
        if not torch.equal(g_orig, g_now):
            zero = g_now == 0
            if zero.any():
                log.warning("shared %s scale has %d zero channels: the residual cannot undo them", norm.path, int(zero.sum()))
            ratio = torch.where(zero, torch.zeros_like(g_now), g_orig / torch.where(zero, torch.ones_like(g_now), g_now))
            w_orig = w_orig * ratio[None, :]
    residual = w_orig - lin.weight.detach()[a:b].float()
    bias_res = None
    if lin.bias is not None:
        bias_res = (original[f"{path}.bias"][a:b].float() - lin.bias.detach()[a:b].float()).to(lin.bias.dtype)
    return residual, bias_res, ratio


# --- keeping the sharing across load_state_dict(assign=True) and effml.load ------------------------
def retie(model: nn.Module, layout: dict) -> None:
    """Make every depth of a group hold the first depth's parameter objects again, and, once the
    model is quantized, the first depth's compressed ``base`` module (whose weight and bias then
    replace the tied linear parameters)."""
    arch = get_arch(model)
    layers = get_submodule(model, arch.layers)
    for group in layout["groups"]:
        first = layers[group[0]]
        in_base = set()  # tied names now held by a shared base module
        for path in arch.linear_paths():
            base = getattr(get_submodule(first, path), "base", None)
            if base is None:
                continue
            in_base |= {f"{path}.weight", f"{path}.bias"}
            for d in group[1:]:
                m = get_submodule(layers[d], path)
                other = getattr(m, "base", None)
                if other is None:
                    raise ValueError(f"depth {d} {path} has no compressed base while depth {group[0]} has one")
                if other is not base:
                    _check_same_state(base, other, f"depths {group[0]} and {d} disagree on shared {path}")
                    m.base = base
        for name in layout["tied_params"]:
            if name in in_base:
                continue
            p = first.get_parameter(name)
            for d in group[1:]:
                q = layers[d].get_parameter(name)
                if q is not p:
                    if q.shape != p.shape or (q.data_ptr() != p.data_ptr() and not torch.equal(q, p)):
                        raise ValueError(f"depths {group[0]} and {d} disagree on tied parameter {name}")
                    _set_parameter(layers[d], name, p)


def _check_same_state(a: nn.Module, b: nn.Module, what: str) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    if sa.keys() != sb.keys() or any(
        sa[k].shape != sb[k].shape or (sa[k].data_ptr() != sb[k].data_ptr() and not torch.equal(sa[k], sb[k]))
        for k in sa
    ):
        raise ValueError(what)


def _retie_hook(layout: dict, module: nn.Module, incompatible_keys) -> None:
    retie(module, layout)


def _attach(model: nn.Module, layout: dict, config: dict) -> None:
    model.effml_recursive = {"layout": layout, "config": config}
    model.register_load_state_dict_post_hook(functools.partial(_retie_hook, layout))


@register_model_transform("recursify")
def _rebuild(model: nn.Module, layout: dict, config: dict) -> nn.Module:
    """On effml.load: the LoRA modules are rebuilt by path; this restores parameter sharing once
    the weights are in (the stored tensors are aliased, so values already agree)."""
    _attach(model, layout, config)
    return model
