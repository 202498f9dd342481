"""Batched shared blocks: one decoder-layer call that serves rows at different loops.

For shared block ``k`` of a cycle model, depth ``j*K + k`` differs from depth ``k`` only in its
LoRA factors and in any norm kept per depth; every other parameter is the same object. A
*block shell* is a structural copy of ``layers[k]`` that holds those same parameter objects (no
weight is copied) with the depth-specific pieces swapped for row-wise versions:

* :class:`RowLoRALinear`: the shared linear plus each row's loop LoRA via :func:`multi_lora`;
* :class:`RowModule`: any other module whose parameters differ per depth (untied norms), each
  row sent through its own loop's module.

Both read the batch's loop indices from a :class:`RowContext` the engine fills before each call.
The shell keeps ``layers[k]``'s own forward, attention type and ``layer_idx`` (= k), so the
attention, norms and residuals are exactly the Hugging Face code.
"""

from __future__ import annotations

import copy
import itertools

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..kernels import has_triton
from ..kernels.multi_lora import BACKENDS, multi_lora, multi_lora_concat
from .lora import DepthLoRALinear


class RowContext:
    """The loop index of every batch row (one token each) for the block call in progress."""

    def __init__(self):
        self.loops: torch.Tensor | None = None
        self.single: int | None = None  # set when all rows share one loop

    def set(self, loops: torch.Tensor, single: int | None = None) -> None:
        self.loops, self.single = loops, single


class RowLoRALinear(nn.Module):
    """The shared ``weight``/``bias`` of one block position plus, per row, the LoRA of its loop.

    ``per_loop[j]`` is depth ``j*K + k``'s :class:`DepthLoRALinear`; their factors are stacked
    (``[loops, r, in]`` / ``[loops, out, r]``) when the engine is built, so later changes to the
    model's LoRA weights need a new engine. Ranks that differ between loops are zero-padded,
    which changes nothing. ``backend``: how mixed-loop batches run the LoRAs (see
    :func:`multi_lora`); ``"auto"`` is the Triton kernel on CUDA and ``"concat"`` elsewhere.
    """

    def __init__(self, per_loop: list[DepthLoRALinear], ctx: RowContext, backend: str = "auto"):
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"lora_backend must be one of {BACKENDS}, got {backend!r}")
        first = per_loop[0]
        for m in per_loop[1:]:
            if m.weight is not first.weight or m.bias is not first.bias or m.roles != first.roles:
                raise ValueError("the depths of a shared block do not share their base linear; "
                                 "was the model made by effml.recursify?")
        self.weight, self.bias = first.weight, first.bias
        self.roles = dict(first.roles)
        if backend == "auto":
            backend = "triton" if first.weight.is_cuda and has_triton() else "concat"
        self.ctx, self.backend = ctx, backend
        self.lora_roles = [r for r in self.roles if any(r in m.ranks for m in per_loop)]
        self.bias_roles = [r for r in self.roles if any(r in m.lora_bias for m in per_loop)]
        with torch.no_grad():
            for role in self.lora_roles:
                a, b = self.roles[role]
                rank = max(m.ranks.get(role, 0) for m in per_loop)
                A = torch.zeros(len(per_loop), rank, first.in_features, dtype=first.weight.dtype, device=first.weight.device)
                B = torch.zeros(len(per_loop), b - a, rank, dtype=A.dtype, device=A.device)
                for j, m in enumerate(per_loop):
                    if role in m.ranks:
                        r = m.ranks[role]
                        A[j, :r], B[j, :, :r] = m.lora_A[role], m.lora_B[role]
                self.register_buffer(f"A_{role}", A, persistent=False)
                self.register_buffer(f"B_{role}", B, persistent=False)
                if backend == "concat":  # [out, loops * rank]: the expand weight of the concatenated LoRA
                    self.register_buffer(f"Bcat_{role}", B.permute(1, 0, 2).reshape(b - a, -1).contiguous(),
                                         persistent=False)
            for role in self.bias_roles:
                a, b = self.roles[role]
                c = torch.stack([m.lora_bias[role].detach() if role in m.lora_bias else first.weight.new_zeros(b - a)
                                 for m in per_loop])
                self.register_buffer(f"c_{role}", c, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        if not self.lora_roles and not self.bias_roles:
            return y
        x2 = x.reshape(-1, x.shape[-1])  # one token per row in decode steps
        loops = self.ctx.loops
        pieces = []
        for role, (a, b) in self.roles.items():
            d = None
            if role in self.lora_roles:
                A, B = getattr(self, f"A_{role}"), getattr(self, f"B_{role}")
                if self.ctx.single is not None:  # one loop for all rows: a plain LoRA, as DepthLoRALinear
                    d = F.linear(F.linear(x2, A[self.ctx.single]), B[self.ctx.single])
                elif self.backend == "concat":
                    d = multi_lora_concat(x2, A, B, loops, B_cat=getattr(self, f"Bcat_{role}"))
                else:
                    d = multi_lora(x2, A, B, loops, backend=self.backend, validate=False)
            if role in self.bias_roles:
                c = getattr(self, f"c_{role}")
                c = c[self.ctx.single] if self.ctx.single is not None else c[loops]
                d = c if d is None else d + c
            if d is None:
                d = x2.new_zeros(x2.shape[0], b - a)
            elif d.dim() == 1:
                d = d.expand(x2.shape[0], b - a)
            pieces.append(d)
        delta = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=-1)
        return y + delta.reshape(y.shape)


class RowModule(nn.Module):
    """A module kept per depth (e.g. an untied norm): each row goes through its loop's copy."""

    def __init__(self, per_loop: list[nn.Module], ctx: RowContext):
        super().__init__()
        self.per_loop = nn.ModuleList(per_loop)
        self.ctx = ctx

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.ctx.single is not None:
            return self.per_loop[self.ctx.single](x)
        loops = self.ctx.loops
        out = None
        for j in loops.unique().tolist():
            rows = (loops == j).nonzero().squeeze(1)
            y = self.per_loop[j](x[rows])
            if out is None:
                out = y.new_empty((x.shape[0], *y.shape[1:]))
            out[rows] = y
        return out


def block_shell(layers: nn.ModuleList, k: int, num_blocks: int, num_loops: int, ctx: RowContext,
                backend: str = "auto", shared=()) -> nn.Module:
    """A copy of ``layers[k]``'s module tree over the same parameter objects, where the pieces
    that differ between depths ``k, K+k, 2K+k, ...`` read each row's loop from ``ctx``.
    ``shared``: further objects the copy must reference rather than duplicate (the config)."""
    depths = [j * num_blocks + k for j in range(num_loops)]
    layer = layers[k]
    memo = {id(t): t for t in itertools.chain(layer.parameters(), layer.buffers(), shared)}
    shell = copy.deepcopy(layer, memo)
    replaced: list[str] = []
    for path, module in layer.named_modules():
        if any(path == p or path.startswith(p + ".") for p in replaced if p):
            continue
        per_loop = [layers[d].get_submodule(path) for d in depths]
        if isinstance(module, DepthLoRALinear):
            if not all(isinstance(m, DepthLoRALinear) for m in per_loop):
                raise ValueError(f"block {k}: {path} has a LoRA at some depths only")
            _replace(shell, path, RowLoRALinear(per_loop, ctx, backend))
            replaced.append(path)
            continue
        own = dict(module.named_parameters(recurse=False))
        if any(m.get_parameter(n) is not p for m in per_loop[1:] for n, p in own.items()):
            if not path:
                raise ValueError(f"block {k}: the decoder layer itself holds per-depth parameters; "
                                 "only whole submodules (e.g. norms) may differ between depths")
            _replace(shell, path, RowModule(per_loop, ctx))
            replaced.append(path)
    return shell


def _replace(root: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, attr = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, attr, new)
