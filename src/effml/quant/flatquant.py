"""FlatQuant (Sun et al., ICML 2025): learned Kronecker affine transforms that flatten weights
and activations before quantization, with learnable clipping, calibrated block by block.

Per block (placement of the paper's Fig. 3): P_a on the q/k/v input and P_ug on the gate/up
input (both with a per-channel scale, later fused into the norm before them), P_d on the
down_proj input (scale fused into up_proj's rows), P_o across heads on the o_proj input with the
per-head value transform P_v merged into v_proj's outputs, and P_h on keys after RoPE (queries
get P_h^{-T}) when the KV cache is quantized. Each factor is U diag(σ) Vᵀ with Cayley-orthogonal
U, V, so the inverse is exact. Calibration: MSE between the block's output and the FP block
output on FP inputs (the engine with propagate="original"), AdamW + cosine; then every
transform's inverse is merged into the weights (float64), the learned weight clipping is baked
in, and the weights are quantized by RTN or GPTQ.

Initialisation differs from the reference code: U starts as a randomized Hadamard (see
``hadamard.random_hadamard``) instead of a Haar-random orthogonal matrix, so a short CPU
calibration starts from a QuaRot-quality rotation (paper: "robust to initialization").
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import torch

from ..core.arch import get_arch, get_submodule
from ..core.calibrate import LayerwiseEngine
from ..core.surgery import block_linears, set_submodule
from .act import ActQuantizer
from .api import register_method
from .apply import quantize_weights, require_calib, wrap_linears
from .config import QuantConfig
from .flat_params import FlatLinear, FlatTransform, OrthoFactor
from .hadamard import near_square_factors, random_hadamard, random_orthogonal
from .kv import install_attention_quant
from .qlinear import QuantLinear
from .transforms import KroneckerTransform

log = logging.getLogger(__name__)

PRESETS = {
    # ~ a 2-core CPU: SmolLM2-135M in well under 40 minutes
    "cpu": {"epochs": 3, "n_samples": 16, "seq_len": 512},
    # the paper's recipe (GPU): 128 x 2048 tokens, 15 epochs
    "paper": {"epochs": 15, "n_samples": 128, "seq_len": 2048},
}
INITS = ("hadamard", "random")
WEIGHTS_IN_LOOP = ("quantized", "float")


@dataclass
class FlatQuantConfig(QuantConfig):
    preset: str = "cpu"
    epochs: int = 3
    lr: float = 5e-3  # transforms and scales
    clip_lr: float = 5e-2  # weight / activation / KV clipping
    weight_decay: float = 0.01  # torch's AdamW default, as in the reference code
    diag_alpha: float = 0.3  # SmoothQuant-style init of the per-channel scale
    lwc: bool = True
    lac: bool = True
    init: str = "hadamard"
    # the weights inside the training loop: "quantized" (RTN fake-quant, as the paper) or "float"
    # (transforms learn the activation / KV error only; GPTQ quantizes the merged weights after)
    weights_in_loop: str = "quantized"
    # the block inputs trained on: "original" (the FP model's, as the paper) or "both" (the
    # quantized model's own inputs, still matched to the FP block on FP inputs: learns to
    # absorb the error of the blocks before it)
    propagate: str = "original"
    # False: stop after merging the transforms (weights float, learned clipping baked in) so one
    # calibration can be finished by several weight quantizers (see ``finish_weights``)
    quantize_weights: bool = True

    def __post_init__(self):
        super().__post_init__()
        if self.preset not in PRESETS:
            raise ValueError(f"FlatQuant preset must be one of {sorted(PRESETS)}, got {self.preset!r}")
        if self.epochs < 0:
            raise ValueError(f"epochs must be >= 0, got {self.epochs}")
        if self.lr <= 0 or self.clip_lr <= 0:
            raise ValueError(f"learning rates must be > 0, got lr={self.lr}, clip_lr={self.clip_lr}")
        if not 0.0 <= self.diag_alpha <= 1.0:
            raise ValueError(f"diag_alpha must be in [0, 1], got {self.diag_alpha}")
        if self.init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {self.init!r}")
        if self.propagate not in ("original", "both"):
            raise ValueError(f"propagate must be one of ('original', 'both'), got {self.propagate!r}")
        if self.weights_in_loop not in WEIGHTS_IN_LOOP:
            raise ValueError(f"weights_in_loop must be one of {WEIGHTS_IN_LOOP}, got {self.weights_in_loop!r}")

    @classmethod
    def build(cls, **kwargs) -> FlatQuantConfig:
        """The preset fills every field the caller did not set."""
        preset = kwargs.get("preset", "cpu")
        if preset not in PRESETS:
            raise ValueError(f"FlatQuant preset must be one of {sorted(PRESETS)}, got {preset!r}")
        return super().build(**{**PRESETS[preset], **kwargs})


def _factor(n: int, cfg: FlatQuantConfig, g: torch.Generator) -> OrthoFactor:
    base = random_hadamard(n, g) if cfg.init == "hadamard" else random_orthogonal(n, g)
    return OrthoFactor(base)


def _kron_transform(n: int, cfg, g, scale: torch.Tensor | None) -> FlatTransform:
    n1, n2 = near_square_factors(n)
    return FlatTransform(_factor(n1, cfg, g) if n1 > 1 else None, _factor(n2, cfg, g), scale)


def _input_absmax(ctx, mods: dict[str, QuantLinear]) -> dict[str, torch.Tensor]:
    stats: dict[str, torch.Tensor] = {}

    def fn(name, module, inp, out):
        m = inp.detach().abs().reshape(-1, inp.shape[-1]).amax(0).float()
        stats[name] = m if name not in stats else torch.maximum(stats[name], m)

    with ctx.hooks(mods, fn):
        ctx.forward(keep=False)
    return stats


class _BlockPlan:
    """What FlatQuant installs in one block: a FlatLinear per linear, keyed by path."""

    def __init__(self):
        self.flat: dict[str, FlatLinear] = {}
        self.norm_scales: list[tuple[str, FlatTransform]] = []  # (norm path, transform with scale)
        self.down_scale: FlatTransform | None = None
        self.qk: OrthoFactor | None = None


def _plan_block(ctx, model, cfg: FlatQuantConfig, g: torch.Generator) -> _BlockPlan:
    arch = get_arch(model)
    info = arch.heads(model.config)
    block = ctx.block
    refs = {ref.path: ref for ref in block_linears(block, ctx.index, arch, model.config)}
    by_role = {r: ref for ref in refs.values() for r in ref.roles}
    plan = _BlockPlan()
    groups: list[tuple[str | None, list, str]] = []
    done = set()
    for norm in arch.norms.values():
        paths = [by_role[r].path for r in norm.feeds if r in by_role]
        paths = [p for i, p in enumerate(paths) if p not in paths[:i] and p not in done]
        if paths:
            groups.append((norm.path, paths, "hidden"))
            done.update(paths)
    for role, kind in (("o", "heads"), ("down", "inter")):
        if role in by_role and by_role[role].path not in done:
            groups.append((None, [by_role[role].path], kind))
            done.add(by_role[role].path)
    missing = [p for p in refs if p not in done]
    if missing:
        raise ValueError(f"{arch.model_type}: FlatQuant found no input group for {missing}")

    first = {paths[0]: refs[paths[0]].module for _, paths, kind in groups if kind != "heads"}
    absmax = _input_absmax(ctx, first)
    p_v = _factor(info.head_dim, cfg, g).to(ctx.device)
    online_of: dict[str, FlatTransform] = {}
    merge_of: dict[str, FlatTransform] = {}
    for norm_path, paths, kind in groups:
        if kind == "heads":
            p_o = _factor(info.n_heads, cfg, g)
            online = FlatTransform(p_o, None).to(ctx.device)
            merge = FlatTransform(p_o, p_v).to(ctx.device)
        else:
            wmax = torch.cat([refs[p].module.weight.detach().float() for p in paths]).abs().amax(0)
            x = absmax[paths[0]].to(wmax.device)
            scale = (wmax.clamp_min(1e-5).pow(1 - cfg.diag_alpha) / x.clamp_min(1e-5).pow(cfg.diag_alpha)).clamp_min(1e-5)
            online = merge = _kron_transform(wmax.numel(), cfg, g, scale).to(ctx.device)
            if kind == "hidden":
                plan.norm_scales.append((norm_path, online))
            else:
                plan.down_scale = online
        for p in paths:
            online_of[p], merge_of[p] = online, merge
    v_ref = by_role.get("v")
    for path, ref in refs.items():
        q = ref.module
        if q.act_quant is not None:
            q.act_quant.ste = True
        out_factor = p_v if v_ref is not None and path == v_ref.path else None
        plan.flat[path] = FlatLinear(
            q.weight, q.bias, online_of[path], merge_of[path], q.act_quant,
            cfg.w_bits if cfg.weights_in_loop == "quantized" else 16, cfg.w_sym, cfg.group_size, cfg.lwc,
            out_factor, ref.roles["v"] if out_factor is not None else None, info.head_dim,
        ).to(ctx.device)
    if cfg.kv_bits < 16:
        plan.qk = _factor(info.head_dim, cfg, g).to(ctx.device)
    return plan


def _attention_hooks(block, arch):
    attn = get_submodule(block, arch.linears["q"].rpartition(".")[0])
    return getattr(attn, "effml_kv", None)


def _param_groups(block, plan: _BlockPlan, cfg: FlatQuantConfig):
    trans, clips, seen = [], [], set()
    for m in block.modules():
        for name, p in m.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            if isinstance(m, FlatLinear) and name.startswith("clip_"):
                clips.append(p)
            elif name == "clip_logit" and cfg.lac:
                clips.append(p)
            elif isinstance(m, (OrthoFactor, FlatTransform)):
                trans.append(p)
    if plan.qk is not None:
        trans += [p for p in plan.qk.parameters() if id(p) not in seen]
    return trans, clips


def _train(ctx, block, plan, cfg: FlatQuantConfig) -> tuple[float, float]:
    trans, clips = _param_groups(block, plan, cfg)
    for p in trans + clips:
        p.requires_grad_(True)
    steps = cfg.epochs * ctx.n_batches
    first = last = float("nan")
    if steps == 0 or not (trans or clips):
        return first, last
    groups = [{"params": trans, "lr": cfg.lr}] + ([{"params": clips, "lr": cfg.clip_lr}] if clips else [])
    opt = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, [lambda s: 1e-3 + (1 - 1e-3) * 0.5 * (1 + math.cos(math.pi * s / steps))] * len(groups)
    )
    with torch.enable_grad():
        for epoch in range(cfg.epochs):
            total = 0.0
            for b in range(ctx.n_batches):
                out = ctx.run_batch(b)
                loss = torch.nn.functional.mse_loss(out.float(), ctx.fp_outputs[b].to(ctx.device).float())
                if not torch.isfinite(loss):
                    raise FloatingPointError(
                        f"FlatQuant calibration diverged (loss {loss.item()}) at {ctx.name}: lower lr/clip_lr "
                        "or calibrate in float32"
                    )
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                total += loss.item()
            mean = total / ctx.n_batches
            first = mean if epoch == 0 else first
            last = mean
    for p in trans + clips:
        p.requires_grad_(False)
    return first, last


@torch.no_grad()
def _merge(block, plan: _BlockPlan, arch, cfg: FlatQuantConfig, refs) -> None:
    """Fold every learned transform into the weights (float64) and put QuantLinears back."""
    block.double()
    new: dict[str, QuantLinear] = {}
    fixed: dict[int, KroneckerTransform] = {}
    for path, flat in plan.flat.items():
        w, b = flat.merged_weight()
        ql = QuantLinear(w.shape[1], w.shape[0], b is not None)
        ql.weight.data = w.float()
        if b is not None:
            ql.bias.data = b.float()
        t = flat.online
        if id(t) not in fixed:
            mat = lambda f: None if f is None else f.matrix().float()  # noqa: E731
            fixed[id(t)] = KroneckerTransform.from_factors(mat(t.left), mat(t.right), w.shape[1])
            ql.input_transform = fixed[id(t)]
        else:
            ql.input_transform = fixed[id(t)].shared_copy()
        if flat.act_quant is not None:
            ql.act_quant = flat.act_quant.float()
            ql.act_quant.ste = False
        new[path] = ql
    # per-channel scales: into the norm that feeds the group, and into up_proj's rows for P_d
    for norm_path, t in plan.norm_scales:
        norm = get_submodule(block, norm_path)
        eff = (norm.weight.double() + arch.norm_offset) * t.scale.double()
        norm.weight.data = (eff - arch.norm_offset).to(norm.weight.dtype)
    if plan.down_scale is not None:
        up = refs[arch.linears["up"]]
        rows = up.roles["up"]
        ql = new[up.path]
        s = plan.down_scale.scale.double()
        ql.weight.data[rows] = (ql.weight.data[rows].double() * s[:, None]).float()
        if ql.bias is not None:
            ql.bias.data[rows] = (ql.bias.data[rows].double() * s).float()
    hooks = _attention_hooks(block, arch)
    if plan.qk is not None and hooks is not None:
        hooks.set_qk_transform(plan.qk.matrix().float())
    block.float()
    for path, ql in new.items():
        set_submodule(block, path, ql)


def _arm_block(ctx, model, cfg: FlatQuantConfig) -> None:
    """Switch on one block's activation and KV quantizers, after the engine has run it in full
    precision: those outputs are the training targets and (propagate="original") the next
    block's inputs, so they must not see any quantizer. Arming every block up front made the
    "FP" targets the outputs of an untransformed W16A4KV4 model."""
    arch = get_arch(model)
    for ref in block_linears(ctx.block, ctx.index, arch, model.config):
        ref.module.act_quant = (ActQuantizer(cfg.a_bits, cfg.a_sym, cfg.a_clip, cfg.lac).to(ctx.device)
                                if cfg.a_bits < 16 else None)
    hooks = _attention_hooks(ctx.block, arch)
    if hooks is not None and cfg.kv_bits < 16:
        hooks.k_quant = ActQuantizer(cfg.kv_bits, cfg.kv_sym, cfg.kv_clip, cfg.lac).to(ctx.device)
        hooks.v_quant = ActQuantizer(cfg.kv_bits, cfg.kv_sym, cfg.kv_clip, cfg.lac).to(ctx.device)


def _calibrate_block(ctx, model, cfg: FlatQuantConfig, g: torch.Generator) -> dict:
    start = time.perf_counter()
    arch = get_arch(model)
    block = ctx.block
    block.requires_grad_(False)
    refs = {ref.path: ref for ref in block_linears(block, ctx.index, arch, model.config)}
    plan = _plan_block(ctx, model, cfg, g)
    for path, flat in plan.flat.items():
        set_submodule(block, path, flat)
    hooks = _attention_hooks(block, arch)
    if plan.qk is not None:
        hooks.trainable_qk = plan.qk
        hooks.k_quant.ste = hooks.v_quant.ste = True
    first, last = _train(ctx, block, plan, cfg)
    if hooks is not None:
        hooks.k_quant.ste = hooks.v_quant.ste = False
    _merge(block, plan, arch, cfg, refs)
    return {"loss_first_epoch": first, "loss_last_epoch": last, "time_s": round(time.perf_counter() - start, 1)}


@register_method("flatquant", FlatQuantConfig, preserves_sparsity=False, prunable_after=False, recursive=False)
def flatquant(model, cfg: FlatQuantConfig, calib):
    calib = require_calib(calib, "flatquant")
    wrap_linears(model)
    if cfg.kv_bits < 16:
        # routes attention through the KV hooks; their quantizers stay off until _arm_block
        install_attention_quant(model, 16, 16, cfg.kv_sym, cfg.kv_clip)
    g = torch.Generator().manual_seed(cfg.seed)
    per_block: list[dict] = []

    def callback(ctx):
        _arm_block(ctx, model, cfg)
        stats = _calibrate_block(ctx, model, cfg, g)
        per_block.append(stats)
        log.info("flatquant %s: loss %.4g -> %.4g (%.1fs)", ctx.name, stats["loss_first_epoch"],
                 stats["loss_last_epoch"], stats["time_s"])
        return stats

    start = time.perf_counter()
    engine = LayerwiseEngine(model, calib, device=cfg.device, batch_size=cfg.batch_size)
    engine.run(callback, propagate=cfg.propagate, desc="flatquant")
    report = {"flatquant_blocks": per_block, "transform_time_s": round(time.perf_counter() - start, 1)}
    if cfg.quantize_weights:
        report.update(quantize_weights(model, _weight_config(cfg), calib))
    else:
        report["weight_quantizer"] = "deferred"
    return report


def _weight_config(cfg: FlatQuantConfig, **override) -> QuantConfig:
    # learned clipping is already in the weights; w_mse=True searches a further clip on top
    return QuantConfig.build(**{**{f: getattr(cfg, f) for f in QuantConfig.field_names()}, **override})


def finish_weights(model, weight_quantizer: str | None = None, calib: torch.Tensor | None = None):
    """Quantize the weights of a model calibrated with ``quantize(..., "flatquant",
    quantize_weights=False)`` by RTN or GPTQ (default: the calibration's ``weight_quantizer``).

    Lets one (slow) transform calibration serve both weight quantizers: deep-copy the model after
    the first step, then finish each copy. Updates ``model.effml_report`` and returns the model.
    """
    from ..core.report import update_last_step
    from .api import linear_bits_per_weight

    report = getattr(model, "effml_report", None)
    if not report or report.get("method") != "flatquant" or report.get("weight_quantizer") != "deferred":
        raise ValueError("finish_weights needs a model from quantize(model, 'flatquant', quantize_weights=False)")
    conf = {k: v for k, v in report["config"].items() if k in FlatQuantConfig.field_names()}
    cfg = FlatQuantConfig.build(**{**conf, "weight_quantizer": weight_quantizer or conf["weight_quantizer"]})
    start = time.perf_counter()
    with torch.no_grad():
        report.update(quantize_weights(model, _weight_config(cfg), calib))
    report["config"]["weight_quantizer"] = cfg.weight_quantizer
    report["config"]["quantize_weights"] = True
    report["calibration_time_s"] = round(report["calibration_time_s"] + time.perf_counter() - start, 2)
    report["linear_bits_per_weight"] = linear_bits_per_weight(model)
    update_last_step(model, "quantize", config=report["config"], seconds=report["calibration_time_s"])
    return model
