"""Module surgery: find linears by role and block, replace modules, untie embeddings."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.nn as nn

from .arch import ArchSpec, get_arch, get_submodule

log = logging.getLogger(__name__)


@dataclass
class LinearRef:
    """One linear inside decoder block ``block``.

    ``roles`` maps each role the module serves to its output-row slice: one full slice for a
    plain projection, several for a fused one (phi3 ``qkv_proj``). ``name`` is the full path
    from the model root; ``path`` the path inside the block.
    """

    block: int
    path: str
    name: str
    module: nn.Module
    roles: dict[str, slice]

    @property
    def role(self) -> str:
        """A single name for the module: ``"q"`` or, when fused, ``"q+k+v"``."""
        return "+".join(self.roles)

    @property
    def fused(self) -> bool:
        return len(self.roles) > 1

    def role_weight(self, role: str) -> torch.Tensor:
        """The rows of ``weight`` that belong to ``role`` (a view: writes go to the module)."""
        return self.module.weight[self.roles[role]]


def block_linears(block: nn.Module, index: int, arch: ArchSpec, config, prefix: str = "") -> list[LinearRef]:
    refs = []
    for path in arch.linear_paths():
        module = get_submodule(block, path)
        refs.append(LinearRef(index, path, f"{prefix}{path}", module, arch.role_slices(path, config)))
    return refs


def iter_linears(
    model: nn.Module, roles: Iterable[str] | None = None, blocks: Iterable[int] | None = None
) -> Iterator[LinearRef]:
    """Every decoder linear, block by block in execution order, optionally filtered.

    A fused module is yielded once if any of its roles is requested.
    """
    arch = get_arch(model)
    wanted = set(roles) if roles is not None else None
    only = set(blocks) if blocks is not None else None
    for i, block in enumerate(get_submodule(model, arch.layers)):
        if only is not None and i not in only:
            continue
        for ref in block_linears(block, i, arch, model.config, prefix=f"{arch.layers}.{i}."):
            if wanted is None or wanted & set(ref.roles):
                yield ref


def set_submodule(root: nn.Module, path: str, new: nn.Module) -> nn.Module:
    """Replace (or add) the module at ``path``; returns the old one, or None if there was none."""
    parent_path, _, attr = path.rpartition(".")
    parent = get_submodule(root, parent_path)
    old = getattr(parent, attr, None)
    setattr(parent, attr, new)
    return old


def replace_linears(
    model: nn.Module,
    factory: Callable[[LinearRef], nn.Module | None],
    roles: Iterable[str] | None = None,
    blocks: Iterable[int] | None = None,
) -> list[str]:
    """Swap decoder linears for ``factory(ref)``; a ``None`` result keeps the original."""
    replaced = []
    for ref in list(iter_linears(model, roles, blocks)):
        new = factory(ref)
        if new is not None:
            set_submodule(model, ref.name, new)
            replaced.append(ref.name)
    return replaced


def embeddings_tied(model: nn.Module) -> bool:
    arch = get_arch(model)
    head = get_submodule(model, arch.lm_head)
    embed = get_submodule(model, arch.embed)
    return head.weight is embed.weight or head.weight.data_ptr() == embed.weight.data_ptr()


def untie_embeddings(model: nn.Module) -> bool:
    """Give ``lm_head`` its own copy of the embedding matrix, so a method may change one without
    the other (rotations, quantization). Returns whether anything was untied."""
    if not embeddings_tied(model):
        return False
    arch = get_arch(model)
    head = get_submodule(model, arch.lm_head)
    head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=head.weight.requires_grad)
    model.config.tie_word_embeddings = False
    text_config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else None
    if text_config is not None and text_config is not model.config:
        text_config.tie_word_embeddings = False
    log.info("untied lm_head from the input embeddings")
    return True


def effective_norm_weight(norm: nn.Module, arch: ArchSpec) -> torch.Tensor:
    """The multiplicative scale a norm applies: ``weight + offset`` (Gemma stores weight - 1)."""
    return norm.weight + arch.norm_offset
