"""``recursify``: tie an L-layer decoder into K shared blocks and relax each depth with a LoRA.

Every depth keeps its own decoder-layer module (so its ``layer_idx``, KV-cache slot and
attention type stay), but the modules of a group hold the *same* ``nn.Parameter`` objects.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Iterable

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ..core.arch import ROLES, ArchSpec, get_arch, get_submodule
from ..core.io import record_transform, register_model_transform
from ..core.surgery import set_submodule
from .activations import input_grams
from .config import RecursiveConfig
from .lora import DepthLoRALinear
from .report import parameter_report
from .sharing import init_sources, share_groups

log = logging.getLogger(__name__)


def recursify(
    model: nn.Module,
    num_loops: int = 2,
    strategy: str = "cycle",
    init: str = "stepwise",
    lora_rank=0,
    lora_init: str = "svd",
    lora_targets: Iterable[str] = ROLES,
    tie_norms: bool | str = True,
    seed: int = 0,
    calib: torch.Tensor | None = None,
    calib_batch_size: int = 1,
    grams: list[dict[str, torch.Tensor]] | None = None,
) -> nn.Module:
    """Convert ``model`` in place into a (relaxed) recursive transformer and return it.

    See :class:`RecursiveConfig` for the arguments. ``model.effml_report["recursify"]`` holds the
    parameter counts before and after, and any rank that was capped at min(in, out).
    ``calib`` (token ids ``[n, seq]``) is needed only by ``lora_init="asvd"``, which weights the
    residual by the original model's inputs on it (see :mod:`.activations`); ``grams`` instead
    passes those statistics precomputed by :func:`effml.recursive.input_grams` on this same
    (unconverted) model, so several conversions of one model pay for them once.
    """
    start = time.perf_counter()
    cfg = RecursiveConfig(num_loops, strategy, init, lora_rank, lora_init, tuple(lora_targets), tie_norms, seed)
    arch = get_arch(model)
    if getattr(model, "effml_recursive", None) is not None:
        raise ValueError("this model is already recursive; recursify the original model instead")
    layers = get_submodule(model, arch.layers)
    groups = share_groups(len(layers), cfg.num_loops, cfg.strategy)  # bad num_loops fails before any work
    if cfg.lora_init != "asvd" or not cfg.relaxed:
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
    before = parameter_report(model)
    tied = tied_parameter_names(layers[0], arch, cfg.tie_norms)
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

    caps, inits, kept = _relax(model, arch, layers, originals, cfg, grams)
    layout = {"groups": groups, "tied_params": tied}
    _attach(model, layout, cfg.to_dict())
    record_transform(model, "recursify", layout=layout, config=cfg.to_dict())

    after = parameter_report(model)
    report = {
        "config": cfg.to_dict(), "groups": groups, "init_layers": sources, "before": before, "after": after,
        "non_embedding_reduction": 1 - after["non_embedding"] / max(before["non_embedding"], 1),
        "rank_caps": caps, "lora_inits": inits,
        # per depth: mean over targets of the fraction of ||W_orig - W_shared|| the SVD LoRA keeps
        "lora_residual_kept": [round(k, 4) for k in kept],
    }
    from ..core.report import add_step

    add_step(model, "recursify", report, method="recursify", config=report["config"],
             seconds=time.perf_counter() - start)
    log.info(
        "recursified %d layers into %d blocks x %d loops (%s, %s init, rank %s): non-embedding params %d -> %d (-%.1f%%)",
        len(layers), len(groups), cfg.num_loops, cfg.strategy, cfg.init, cfg.lora_rank,
        before["non_embedding"], after["non_embedding"], 100 * report["non_embedding_reduction"],
    )
    for c in caps:
        log.warning("LoRA rank capped: %s", c)
    return model


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


def _relax(model, arch: ArchSpec, layers, originals, cfg: RecursiveConfig, grams=None) -> tuple[list[str], dict, list[float]]:
    """Wrap each target linear of every depth in a :class:`DepthLoRALinear` initialised from the
    residual between the original weight (with any tied-norm change folded in) and the shared one.
    ``grams`` (per depth, per path: E[x xᵀ] of the original inputs) switches to the activation-aware init."""
    if not cfg.relaxed:
        return [], {}, []
    gen = torch.Generator().manual_seed(cfg.seed)
    caps: set[str] = set()
    inits: dict[str, int] = {}
    kept: list[float] = []
    bar = tqdm(layers, desc="recursify: LoRA init", unit="depth", leave=False)
    for d, layer in enumerate(bar):
        fractions = []
        for path in arch.linear_paths():
            lin = get_submodule(layer, path)
            out_f, in_f = lin.weight.shape
            roles = {r: _rows(s, out_f) for r, s in arch.role_slices(path, model.config).items()}
            ranks = {}
            for role, (a, b) in roles.items():
                want = cfg.ranks.get(role, 0)
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
                    gram = None
                    if grams is not None:
                        gram = grams[d][path]
                        if ratio is not None:  # the shared norm rescales the inputs: x_shared = x_orig / ratio
                            inv = torch.where(ratio == 0, torch.ones_like(ratio), 1 / torch.where(ratio == 0, 1.0, ratio))
                            gram = gram * inv[:, None] * inv[None, :]
                    kind, frac = new.init_from_residual(role, residual, bias_res, gen, gram=gram)
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
