"""Uptraining a recursive student by distillation from the original model.

One AdamW run through ``accelerate`` (CPU, one GPU, or several under ``accelerate launch``):
online teacher logits, linear warmup then cosine decay, optional early-exit loss at loop
boundaries, and checkpoints as safetensors + JSON that resume bit-for-bit (data order and LR
are functions of the step, so nothing else needs saving).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ..core.arch import get_arch, get_submodule
from ..core.validate import check_token_ids
from .losses import KD_KINDS, kd_loss, next_token_ce

log = logging.getLogger(__name__)

CHECKPOINT_WEIGHTS = "trainable.safetensors"
CHECKPOINT_OPTIM = "optimizer.safetensors"
CHECKPOINT_META = "state.json"


@dataclass
class UptrainConfig:
    steps: int
    lr: float = 2e-4
    kd: str = "forward_kl"
    kd_weight: float = 1.0
    ce_weight: float = 0.0
    temperature: float = 1.0
    batch_size: int = 4
    warmup_steps: int | None = None  # default: 5% of steps
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    early_exit: bool = False
    early_exit_weight: float = 0.1  # "Aggressive" coefficient for intermediate loops
    seed: int = 0
    log_every: int = 1
    eval_every: int | None = None
    checkpoint_dir: str | None = None
    checkpoint_every: int | None = None
    gradient_checkpointing: bool = False
    stop_at: int | None = None  # end this run after this step (a time-sliced job); resume later

    def __post_init__(self):
        def pos_int(name, v, allow_none=False):
            if v is None and allow_none:
                return
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")

        pos_int("steps", self.steps)
        pos_int("batch_size", self.batch_size)
        pos_int("log_every", self.log_every)
        pos_int("eval_every", self.eval_every, allow_none=True)
        pos_int("checkpoint_every", self.checkpoint_every, allow_none=True)
        pos_int("stop_at", self.stop_at, allow_none=True)
        if self.kd not in KD_KINDS:
            raise ValueError(f"unknown kd {self.kd!r}; choose one of {KD_KINDS}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.kd_weight < 0 or self.ce_weight < 0 or self.kd_weight + self.ce_weight == 0:
            raise ValueError(f"kd_weight and ce_weight must be >= 0 and not both 0, got {self.kd_weight}, {self.ce_weight}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.warmup_steps is None:
            self.warmup_steps = max(1, round(0.05 * self.steps))
        if not 0 <= self.warmup_steps <= self.steps:
            raise ValueError(f"warmup_steps must be in [0, steps={self.steps}], got {self.warmup_steps}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.early_exit_weight < 0:
            raise ValueError(f"early_exit_weight must be >= 0, got {self.early_exit_weight}")
        if (self.checkpoint_every is not None or self.stop_at is not None) and self.checkpoint_dir is None:
            raise ValueError("checkpoint_every and stop_at need checkpoint_dir")


def lr_at(step: int, cfg: UptrainConfig) -> float:
    """Learning rate for optimizer step ``step`` (0-indexed): linear warmup, then cosine to
    ``min_lr_ratio * lr`` at the last step."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps - 1)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def batch_indices(step: int, n: int, batch_size: int, seed: int, rank: int = 0, world: int = 1) -> list[int]:
    """Rows of the data for this step and process: a seeded permutation per epoch, so the order
    depends only on (seed, step) and a resumed run sees the same batches."""
    per_step = batch_size * world
    start = step * per_step + rank * batch_size
    out = []
    for pos in range(start, start + batch_size):
        epoch, i = divmod(pos, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
        out.append(int(perm[i]))
    return out


def exit_depths(student: nn.Module) -> list[int]:
    """Depth indices after which a loop ends (excluding the last): early-exit points. Needs the
    cycle strategy, where every loop runs the whole shared stack once."""
    rec = getattr(student, "effml_recursive", None)
    if rec is None:
        raise ValueError("early_exit needs a model made by effml.recursify")
    cfg = rec["config"]
    if cfg["strategy"] != "cycle":
        raise ValueError(f"early_exit needs strategy='cycle' (loop boundaries), the model uses {cfg['strategy']!r}")
    k = len(rec["layout"]["groups"])
    return [j * k - 1 for j in range(1, cfg["num_loops"])]


def uptrain(
    student: nn.Module,
    teacher: nn.Module,
    data: torch.Tensor,
    steps: int,
    lr: float = 2e-4,
    kd: str = "forward_kl",
    ce_weight: float = 0.0,
    early_exit: bool = False,
    resume: bool = False,
    eval_fn: Callable[[nn.Module], dict] | None = None,
    accelerator=None,
    **kwargs,
) -> dict:
    """Distil ``teacher`` into ``student`` on ``data`` (``[n, seq_len]`` token ids).

    Other keyword arguments are :class:`UptrainConfig` fields. ``eval_fn(student) -> dict`` runs
    before training, every ``eval_every`` steps and at the end. With ``resume=True`` training
    continues from the checkpoint in ``checkpoint_dir`` if there is one. Returns a summary with
    the per-step ``history`` and the ``evals``.
    """
    cfg = UptrainConfig(steps=steps, lr=lr, kd=kd, ce_weight=ce_weight, early_exit=early_exit, **kwargs)
    data = check_token_ids(data, student, what="data", min_len=2)  # next-token targets need 2 tokens
    if resume and cfg.checkpoint_dir is None:
        raise ValueError("resume=True needs checkpoint_dir")
    exits = exit_depths(student) if cfg.early_exit else []
    if accelerator is None:
        from accelerate import Accelerator

        accelerator = Accelerator(cpu=not torch.cuda.is_available())
    torch.manual_seed(cfg.seed)

    use_cache = getattr(student.config, "use_cache", None)
    if cfg.gradient_checkpointing:
        student.gradient_checkpointing_enable()
        student.config.use_cache = False
    student.train()
    for p in student.parameters():
        p.requires_grad_(True)
    teacher.eval().requires_grad_(False)
    params = list(student.parameters())  # each shared tensor once
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    student, optimizer = accelerator.prepare(student, optimizer)
    teacher.to(accelerator.device)

    history: list[dict] = []
    evals: list[dict] = []
    start = 0
    if resume and (Path(cfg.checkpoint_dir) / CHECKPOINT_META).is_file():
        start, history, evals = load_checkpoint(cfg.checkpoint_dir, accelerator.unwrap_model(student), optimizer)
        log.info("resumed from %s at step %d", cfg.checkpoint_dir, start)

    def run_eval(step):
        if eval_fn is None:
            return
        row = {"step": step, **eval_fn(accelerator.unwrap_model(student))}
        student.train()
        evals.append(row)
        log.info("eval at step %d: %s", step, row)

    if start == 0 and not evals:
        run_eval(0)
    end = cfg.steps if cfg.stop_at is None else min(cfg.steps, cfg.stop_at)
    bar = tqdm(range(start, end), desc="uptrain", unit="step", disable=not accelerator.is_local_main_process)
    t0 = time.perf_counter()
    for step in bar:
        lr_now = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr_now
        rows = batch_indices(step, data.shape[0], cfg.batch_size, cfg.seed, accelerator.process_index,
                             accelerator.num_processes)
        ids = data[rows].to(accelerator.device)
        losses = _step_loss(student, teacher, ids, cfg, exits, accelerator)
        accelerator.backward(losses["loss"])
        if cfg.max_grad_norm is not None:
            grad_norm = accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
            losses["grad_norm"] = float(grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        row = {"step": step + 1, "lr": lr_now, **{k: float(v.detach()) if isinstance(v, torch.Tensor) else float(v) for k, v in losses.items()}}
        history.append(row)
        if (step + 1) % cfg.log_every == 0:
            bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{lr_now:.2e}")
            log.info("step %d/%d loss %.4f lr %.2e", step + 1, cfg.steps, row["loss"], lr_now)
        if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.steps:
            run_eval(step + 1)
        if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 and accelerator.is_main_process:
            save_checkpoint(cfg.checkpoint_dir, accelerator.unwrap_model(student), optimizer, step + 1, history, evals, cfg)
    if start < end == cfg.steps:
        run_eval(cfg.steps)
    if cfg.checkpoint_dir is not None and accelerator.is_main_process and start < end:
        save_checkpoint(cfg.checkpoint_dir, accelerator.unwrap_model(student), optimizer, end, history, evals, cfg)
    student = accelerator.unwrap_model(student)
    student.eval()
    if cfg.gradient_checkpointing:
        student.gradient_checkpointing_disable()
        student.config.use_cache = use_cache
    return {"config": asdict(cfg), "history": history, "evals": evals, "seconds": time.perf_counter() - t0}


def _step_loss(student, teacher, ids, cfg: UptrainConfig, exits: list[int], accelerator) -> dict:
    with torch.no_grad():
        t_logits = teacher(input_ids=ids, use_cache=False).logits
    out = student(input_ids=ids, use_cache=False, output_hidden_states=bool(exits))
    s_logits = out.logits
    losses = {}
    total = 0.0
    if cfg.kd_weight > 0:
        losses["kd"] = kd_loss(s_logits, t_logits, cfg.kd, cfg.temperature)
        total = total + cfg.kd_weight * losses["kd"]
    if cfg.ce_weight > 0:
        losses["ce"] = next_token_ce(s_logits, ids)
        total = total + cfg.ce_weight * losses["ce"]
    if exits:
        # "Aggressive" early exit: each intermediate loop learns from the detached final loop
        # (self-distillation) with a small coefficient, so the final output is not traded away.
        model = accelerator.unwrap_model(student)
        final = s_logits.detach()
        ee = 0.0
        for d in exits:
            logits = exit_logits(model, out.hidden_states[d + 1])
            ee = ee + kd_loss(logits, final, "forward_kl", cfg.temperature)
        losses["early_exit"] = ee / len(exits)
        total = total + cfg.early_exit_weight * ee
    losses["loss"] = total
    return losses


# --- checkpoints: safetensors + JSON ---------------------------------------------------------
def save_checkpoint(directory, model: nn.Module, optimizer, step: int, history, evals, cfg: UptrainConfig) -> Path:
    from safetensors.torch import save_file

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    names = {id(p): n for n, p in model.named_parameters()}  # shared tensors appear once
    weights = {n: p.detach().contiguous().cpu() for n, p in model.named_parameters()}
    opt_tensors, opt_meta = {}, []
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            entry = {"param": names[id(p)], "scalars": {}}
            for k, v in state.items():
                if isinstance(v, torch.Tensor) and v.dim() > 0:
                    opt_tensors[f"{names[id(p)]}::{k}"] = v.detach().contiguous().cpu()
                else:
                    entry["scalars"][k] = float(v)
            opt_meta.append(entry)
    tmp = out / (CHECKPOINT_META + ".tmp")
    save_file(weights, str(out / CHECKPOINT_WEIGHTS))
    save_file(opt_tensors, str(out / CHECKPOINT_OPTIM))
    tmp.write_text(json.dumps({"step": step, "history": history, "evals": evals, "optimizer": opt_meta,
                               "config": asdict(cfg)}, indent=1))
    tmp.replace(out / CHECKPOINT_META)  # the step marker is written last, so a torn save is not resumed
    log.info("checkpoint at step %d -> %s", step, out)
    return out


def load_checkpoint(directory, model: nn.Module, optimizer) -> tuple[int, list, list]:
    from safetensors.torch import load_file

    src = Path(directory)
    meta = json.loads((src / CHECKPOINT_META).read_text())
    weights = load_file(str(src / CHECKPOINT_WEIGHTS))
    params = dict(model.named_parameters())
    name_of = {id(p): n for n, p in params.items()}
    if set(weights) != set(params):
        raise ValueError(f"{src}: checkpoint parameters do not match the model (was it made with the same recursify settings?)")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(weights[n])
    tensors = load_file(str(src / CHECKPOINT_OPTIM))
    by_param = {e["param"]: e for e in meta["optimizer"]}
    for group in optimizer.param_groups:
        for p in group["params"]:
            name = name_of[id(p)]
            entry = by_param.get(name)
            if entry is None:
                continue
            state = {k: torch.tensor(v) for k, v in entry["scalars"].items()}
            prefix = f"{name}::"
            state.update({k[len(prefix):]: v.to(p.device) for k, v in tensors.items() if k.startswith(prefix)})
            if state:
                optimizer.state[p] = state
    return meta["step"], meta["history"], meta["evals"]


def exit_logits(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Logits from an intermediate hidden state through the model's own final norm and LM head
    (and final logit soft-capping where the config sets it), with gradients."""
    arch = get_arch(model)
    logits = get_submodule(model, arch.lm_head)(get_submodule(model, arch.final_norm)(hidden))
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits
