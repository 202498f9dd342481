"""Shared surgery for transform methods: fold norm scales into linears and install online
input transforms whose inverse is merged into the consuming weights."""

from __future__ import annotations

import torch
import torch.nn as nn

from ..core.arch import ArchSpec, get_arch, get_submodule
from ..core.surgery import block_linears
from .qlinear import QuantLinear
from .transforms import KroneckerTransform


def input_groups(block: nn.Module, index: int, arch: ArchSpec, config) -> list[tuple[str | None, list[QuantLinear], str]]:
    """The block's linears grouped by the activation they consume:
    ``(norm path or None, modules, kind)`` with kind "hidden" (after a norm), "heads" (o_proj),
    "inter" (down_proj). Fused modules appear once."""
    refs = block_linears(block, index, arch, config)
    by_role = {r: ref.module for ref in refs for r in ref.roles}
    groups, done = [], set()
    for norm in arch.norms.values():
        if not norm.feeds:
            continue
        mods = []
        for role in norm.feeds:
            m = by_role.get(role)
            if m is not None and id(m) not in done:
                mods.append(m)
                done.add(id(m))
        if mods:
            groups.append((norm.path, mods, "hidden"))
    for role, kind in (("o", "heads"), ("down", "inter")):
        m = by_role.get(role)
        if m is not None and id(m) not in done:
            groups.append((None, [m], kind))
            done.add(id(m))
    missing = [r for r, m in by_role.items() if id(m) not in done]
    if missing:
        raise ValueError(f"{arch.model_type}: no input group for roles {missing}; describe them in the ArchSpec")
    return groups


@torch.no_grad()
def fold_norm(block: nn.Module, norm_path: str, mods: list[QuantLinear], arch: ArchSpec) -> None:
    """W <- W diag(g) for every consumer of the norm, then the norm's effective scale becomes 1."""
    norm = get_submodule(block, norm_path)
    g = (norm.weight.double() + arch.norm_offset)
    for m in mods:
        m.weight.data = (m.weight.double() * g).to(m.weight.dtype)
    norm.weight.data.fill_(1.0 - arch.norm_offset)


@torch.no_grad()
def install_transform(mods: list[QuantLinear], transform: KroneckerTransform) -> None:
    """Every module in ``mods`` gets ``transform`` online (shared parameters) and its inverse
    merged into its float weight."""
    for i, m in enumerate(mods):
        if m.weight is None:
            raise ValueError("transforms must be installed before weights are quantized")
        m.weight.data = transform.merge_into(m.weight.data)
        m.input_transform = transform if i == 0 else transform.shared_copy()


def block_of(model: nn.Module, i: int) -> nn.Module:
    return get_submodule(model, get_arch(model).layers)[i]
