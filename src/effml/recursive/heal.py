"""``heal``: block-local, teacher-forced hidden-state distillation of a compressed student.

The teacher (the original model) runs block by block on the calibration data through the core
:class:`~effml.core.calibrate.LayerwiseEngine` (``propagate="original"``), which hands every
teacher block its own inputs and outputs. Each student layer ``j`` replaces a contiguous span of
teacher layers ``start..end``; it is trained to map the teacher's hidden state *entering*
``start`` to the teacher's hidden state *leaving* ``end``, with the call arguments (masks,
rotary tables, attention type) of the teacher layer it came from. The map comes from the report
of :func:`effml.recursify` (depth ``d`` -> layer ``d``: spans of one layer) or
:func:`effml.recursive.drop_layers` (kept layer -> its source; with ``absorb_dropped=True`` a
kept layer also stands in for the dropped layers just before it, and the last one for those
after it, since that is what it replaces in the student's forward pass).

Loss: normalised MSE ``||y_student - y_teacher||² / ||y_teacher||²`` of the block output (the
residual stream), AdamW, one optimizer per block, seeded shuffling of the calibration batches.

What trains (``train=``):

* ``"private"`` (default): the parameters that this student layer alone uses: its LoRA factors
  and bias corrections, its own norms when the recursive model keeps norms per depth
  (``tie_norms=False``/``"foldable"``), the whole block in a layer-dropped model (nothing is
  shared there). Training one depth then cannot undo another depth's fit.
* ``"lora"``: only the LoRA factors (and per-depth bias corrections).
* ``"lora+norms"``: LoRA plus every norm weight of the block, *including tied norms*.
* ``"all"``: every parameter of the block, including the weights a recursive model shares
  between depths.

With ``"lora+norms"`` and ``"all"`` a shared tensor is updated by each of its depths in turn, so a
later depth moves what an earlier one fitted (a block-local objective cannot train a shared
"centroid"; end-to-end uptraining does, see :func:`effml.recursive.uptrain`). The report then also
gives each block's loss after *all* blocks were trained (``final``, one more teacher pass).
"""

from __future__ import annotations

import copy
import logging
import time

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ..core.arch import get_arch, get_submodule
from ..core.calibrate import BlockContext, LayerwiseEngine
from ..core.validate import check_token_ids
from .lora import DepthLoRALinear
from .report import source_layers

log = logging.getLogger(__name__)

TRAIN_CHOICES = ("private", "lora", "lora+norms", "all")


def heal(
    student: nn.Module,
    teacher: nn.Module,
    calib: torch.Tensor,
    epochs: int = 1,
    lr: float = 1e-4,
    *,
    train: str = "private",
    batch_size: int = 1,
    weight_decay: float = 0.0,
    max_grad_norm: float | None = 1.0,
    seed: int = 0,
    layer_map: list[int] | None = None,
    absorb_dropped: bool = True,
    device: torch.device | str | None = None,
) -> tuple[nn.Module, dict]:
    """Distil ``teacher`` into ``student`` block by block (in place); returns ``(student, report)``.

    ``calib``: ``[n, seq_len]`` token ids; ``batch_size`` rows form one optimizer step, and every
    block sees each batch ``epochs`` times. ``layer_map``: for each student layer, the teacher
    layer it came from (default: read from the student's recursify / drop_layers report).
    ``report["blocks"]`` lists, per student layer, the teacher span it replaces and its loss
    ``before`` and ``after`` training (and ``final`` when shared tensors were trained); the same
    report is stored as ``student.effml_report["heal"]``.
    """
    start_time = time.perf_counter()
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be a positive int, got {epochs!r}")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or lr < 0:
        raise ValueError(f"lr must be a number >= 0, got {lr!r}")
    if train not in TRAIN_CHOICES:
        raise ValueError(f"unknown train={train!r}; choose one of {TRAIN_CHOICES}")
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    if student is teacher:
        raise ValueError("student and teacher are the same model: pass the original (uncompressed) model as teacher, "
                         "e.g. teacher = copy.deepcopy(model) before recursify / drop_layers")
    calib = check_token_ids(calib, teacher, what="calib")
    arch, t_arch = get_arch(student), get_arch(teacher)
    if arch.model_type != t_arch.model_type or student.config.hidden_size != teacher.config.hidden_size:
        raise ValueError(f"student ({arch.model_type}, hidden {student.config.hidden_size}) and teacher "
                         f"({t_arch.model_type}, hidden {teacher.config.hidden_size}) are not the same architecture")
    s_layers = get_submodule(student, arch.layers)
    t_layers = get_submodule(teacher, t_arch.layers)
    src, spans = _spans(student, len(s_layers), len(t_layers), layer_map, absorb_dropped)
    t_ids = {id(p) for p in teacher.parameters()}
    if any(id(p) in t_ids for p in s_layers.parameters()):
        raise ValueError("student and teacher share parameters: the teacher must stay the original model. Pass a "
                         "copy made before compressing (teacher = copy.deepcopy(model))")
    trainable = _trainable(student, arch, s_layers, train)
    if not any(trainable):
        raise ValueError(f"train={train!r} finds nothing to train in the student (no LoRA and no parameter private to a "
                         "layer, e.g. a recursive model with lora_rank=0 and tied norms): use train='all', or relax "
                         "the model with lora_rank > 0 / param_budget")
    owners: dict[int, int] = {}
    for layer in s_layers:
        for p in layer.parameters():
            owners[id(p)] = owners.get(id(p), 0) + 1
    shared_trained = any(owners[id(p)] > 1 for ps in trainable for p in ps)

    cfg = {"epochs": epochs, "lr": float(lr), "train": train, "batch_size": batch_size, "weight_decay": weight_decay,
           "max_grad_norm": max_grad_norm, "seed": seed, "absorb_dropped": absorb_dropped,
           "n_calib": int(calib.shape[0]), "seq_len": int(calib.shape[1])}
    was_training = student.training
    student.eval()
    teacher.eval()
    flags = {id(p): p.requires_grad for p in s_layers.parameters()}
    engine = LayerwiseEngine(teacher, calib, device=device, batch_size=batch_size)
    starts = {s: j for j, (s, _) in enumerate(spans)}
    ends = {e: j for j, (_, e) in enumerate(spans)}
    blocks: list[dict] = [{} for _ in s_layers]
    held: dict[str, list[torch.Tensor]] = {}

    def student_ctx(j: int) -> BlockContext:
        # the student layer j, on the teacher inputs entering its span, with the call arguments
        # (mask, rotary, attention type) of the teacher layer it came from
        return BlockContext(engine, src[j], s_layers[j], held["inputs"])

    def train_callback(ctx: BlockContext):
        i = ctx.index
        if i in starts:
            held["inputs"] = ctx.inputs
        if i not in ends:
            return None
        j = ends[i]
        block = s_layers[j]
        home = _device_of(block)
        block.to(engine.device)
        try:
            sctx = student_ctx(j)
            targets = ctx.fp_outputs
            before = _eval_loss(sctx, targets)
            steps = 0
            if trainable[j]:
                steps = _train_block(sctx, targets, trainable[j], block, epochs, lr, weight_decay, max_grad_norm,
                                     seed + j, f"heal: layer {j}")
            after = _eval_loss(sctx, targets)
        finally:
            block.to(home)
        blocks[j] = {"layer": j, "source": src[j], "teacher_span": list(spans[j]), "before": before, "after": after,
                     "trainable_params": sum(p.numel() for p in trainable[j]), "steps": steps}
        log.info("heal layer %d (teacher %d..%d): nmse %.4g -> %.4g (%d steps)", j, *spans[j], before, after, steps)
        return {"layer": j, "before": before, "after": after}

    try:
        torch.manual_seed(seed)
        engine.run(train_callback, propagate="original", desc="heal")
        if shared_trained:
            def eval_callback(ctx: BlockContext):
                i = ctx.index
                if i in starts:
                    held["inputs"] = ctx.inputs
                if i in ends:
                    j = ends[i]
                    block = s_layers[j]
                    home = _device_of(block)
                    block.to(engine.device)
                    try:
                        blocks[j]["final"] = _eval_loss(student_ctx(j), ctx.fp_outputs)
                    finally:
                        block.to(home)
                return None

            engine.run(eval_callback, propagate="original", desc="heal: final losses")
    finally:
        for p in s_layers.parameters():
            p.requires_grad_(flags[id(p)])
        student.train(was_training)
    key = "final" if shared_trained else "after"
    report = {
        "config": cfg, "loss": "nmse: ||y_student - y_teacher||^2 / ||y_teacher||^2 of the block output",
        "teacher_num_layers": len(t_layers), "blocks": blocks,
        "mean_before": sum(b["before"] for b in blocks) / len(blocks),
        "mean_after": sum(b[key] for b in blocks) / len(blocks),
        "shared_trained": shared_trained, "seconds": time.perf_counter() - start_time,
    }
    rep = getattr(student, "effml_report", None)
    student.effml_report = {**(rep if isinstance(rep, dict) else {}), "heal": copy.deepcopy(report)}
    log.info("heal: mean block nmse %.4g -> %.4g over %d layers", report["mean_before"], report["mean_after"],
             len(blocks))
    return student, report


def _spans(student, n_student: int, n_teacher: int, layer_map, absorb: bool) -> tuple[list[int], list[tuple[int, int]]]:
    """Per student layer: its source teacher layer and the teacher span ``(start, end)`` it replaces."""
    if layer_map is None:
        src, expected = source_layers(student, n_student)
        if expected != n_teacher:
            raise ValueError(f"the student's layers come from a {expected}-layer model (its recursify / drop_layers "
                             f"report) but the teacher has {n_teacher} layers: pass the original model as teacher, or "
                             "give layer_map=[teacher layer of each student layer]")
    else:
        src = [int(i) for i in layer_map]
        if len(src) != n_student:
            raise ValueError(f"layer_map needs one teacher layer per student layer ({n_student}), got {len(src)}")
    if any(not 0 <= i < n_teacher for i in src):
        raise ValueError(f"layer_map {src} names layers outside the teacher's 0..{n_teacher - 1}")
    if any(b <= a for a, b in zip(src, src[1:])):
        raise ValueError(f"layer_map {src} must be strictly increasing (the student keeps the teacher's layer order)")
    if not absorb:
        return src, [(i, i) for i in src]
    spans = []
    for j, i in enumerate(src):
        start = 0 if j == 0 else src[j - 1] + 1
        end = n_teacher - 1 if j == len(src) - 1 else i
        spans.append((start, end))
    return src, spans


def _trainable(student, arch, layers, train: str) -> list[list[nn.Parameter]]:
    uses: dict[int, int] = {}
    for layer in layers:
        for p in layer.parameters():
            uses[id(p)] = uses.get(id(p), 0) + 1
    out = []
    for layer in layers:
        lora = [p for m in layer.modules() if isinstance(m, DepthLoRALinear) for p in m.lora_parameters()]
        if train == "lora":
            chosen = lora
        elif train == "lora+norms":
            norms = [p for spec in arch.norms.values() for p in get_submodule(layer, spec.path).parameters()]
            chosen = lora + norms
        elif train == "all":
            chosen = list(layer.parameters())
        else:  # private
            chosen = [p for p in layer.parameters() if uses[id(p)] == 1]
        seen, unique = set(), []
        for p in chosen:
            if id(p) not in seen and p.dtype.is_floating_point:
                seen.add(id(p))
                unique.append(p)
        out.append(unique)
    return out


def _device_of(module: nn.Module) -> torch.device:
    p = next(module.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _nmse_parts(y: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    t = t.to(y.device, torch.float32)
    return (y.float() - t).square().sum(), t.square().sum()


@torch.no_grad()
def _eval_loss(sctx: BlockContext, targets: list[torch.Tensor]) -> float:
    err = ref = 0.0
    for b in range(sctx.n_batches):
        e, r = _nmse_parts(sctx.run_batch(b), targets[b])
        err += float(e)
        ref += float(r)
    return err / max(ref, 1e-30)


def _train_block(sctx: BlockContext, targets, params, block, epochs, lr, weight_decay, max_grad_norm, seed,
                 desc) -> int:
    for p in block.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed)
    n = sctx.n_batches
    bar = tqdm(total=epochs * n, desc=desc, unit="step", leave=False)
    steps = 0
    with torch.enable_grad():
        for _ in range(epochs):
            for b in torch.randperm(n, generator=gen).tolist():
                e, r = _nmse_parts(sctx.run_batch(b), targets[b])
                loss = e / r.clamp_min(1e-30)
                loss.backward()
                if max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
                opt.step()
                opt.zero_grad(set_to_none=True)
                steps += 1
                bar.update(1)
                bar.set_postfix(loss=f"{float(loss.detach()):.4g}")
    bar.close()
    for p in params:
        p.grad = None
    return steps
