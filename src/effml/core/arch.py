"""Architecture descriptions: where each model family keeps its layers, linears and norms.

A family is data, not code: one :class:`ArchSpec` registered under ``config.model_type``.
Methods never branch on the family; they ask the spec (see ``families.py`` for the entries).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.nn as nn

# Canonical linear roles inside a decoder block, in execution order.
ROLES = ("q", "k", "v", "o", "gate", "up", "down")


@dataclass(frozen=True)
class Fused:
    """A linear holding several roles stacked along its output rows (e.g. phi3 ``qkv_proj``).

    ``sizes`` names, per role, the config-derived row count: ``"q"`` -> heads*head_dim,
    ``"kv"`` -> kv_heads*head_dim, ``"inter"`` -> intermediate_size.
    """

    roles: tuple[str, ...]
    sizes: tuple[str, ...]


@dataclass(frozen=True)
class NormSpec:
    """A norm inside a block. ``feeds`` lists the roles whose input it scales (empty when the
    norm scales a block output, as Gemma's post-attention / post-feed-forward norms do)."""

    path: str
    feeds: tuple[str, ...] = ()
    per_head: bool = False  # q_norm / k_norm act on head_dim, after the projection


@dataclass(frozen=True)
class ArchSpec:
    model_type: str
    # role -> module path inside a decoder block; a fused linear appears under each of its roles
    linears: dict[str, str]
    norms: dict[str, NormSpec]
    fused: dict[str, Fused] = field(default_factory=dict)  # module path -> fused layout
    layers: str = "model.layers"
    embed: str = "model.embed_tokens"
    final_norm: str = "model.norm"
    lm_head: str = "lm_head"
    rotary: str | None = "model.rotary_emb"
    # RMSNorm scale is (offset + weight): 1.0 for Gemma, 0.0 elsewhere. Folding a norm into a
    # linear must use the effective scale, not the raw parameter.
    norm_offset: float = 0.0
    # Groups of roles that consume the same input, in execution order (GPTQ-style sequential).
    sequential: tuple[tuple[str, ...], ...] = (("q", "k", "v"), ("o",), ("gate", "up"), ("down",))

    def __post_init__(self):
        unknown = set(self.linears) - set(ROLES)
        if unknown:
            raise ValueError(f"{self.model_type}: unknown linear roles {sorted(unknown)}; roles are {ROLES}")

    # --- config-derived shapes -------------------------------------------------------------
    @staticmethod
    def heads(config) -> HeadInfo:
        n_heads = config.num_attention_heads
        n_kv = getattr(config, "num_key_value_heads", None) or n_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
        return HeadInfo(n_heads, n_kv, head_dim, config.hidden_size, config.intermediate_size)

    def role_slices(self, path: str, config) -> dict[str, slice]:
        """Row slices of each role inside the linear at ``path`` (one full slice if not fused)."""
        if path not in self.fused:
            roles = [r for r, p in self.linears.items() if p == path]
            return {r: slice(None) for r in roles}
        h = self.heads(config)
        size_of = {"q": h.n_heads * h.head_dim, "kv": h.n_kv_heads * h.head_dim, "inter": h.intermediate}
        out, start = {}, 0
        for role, size in zip(self.fused[path].roles, self.fused[path].sizes):
            out[role] = slice(start, start + size_of[size])
            start += size_of[size]
        return out

    def linear_paths(self) -> list[str]:
        """Distinct linear module paths in a block, in role order."""
        seen: list[str] = []
        for role in ROLES:
            p = self.linears.get(role)
            if p is not None and p not in seen:
                seen.append(p)
        return seen

    def roles_of(self, path: str) -> tuple[str, ...]:
        return tuple(r for r in ROLES if self.linears.get(r) == path)

    def norm_feeding(self, role: str) -> NormSpec | None:
        for n in self.norms.values():
            if role in n.feeds:
                return n
        return None


@dataclass(frozen=True)
class HeadInfo:
    n_heads: int
    n_kv_heads: int
    head_dim: int
    hidden: int
    intermediate: int

    @property
    def gqa_groups(self) -> int:
        return self.n_heads // self.n_kv_heads


_REGISTRY: dict[str, ArchSpec] = {}

_HOW_TO_REGISTER = """To add a family, describe it in a few lines:

    from effml.core.arch import ArchSpec, NormSpec, register_arch
    register_arch(ArchSpec(
        model_type="myfamily",
        linears={"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
                 "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj",
                 "down": "mlp.down_proj"},
        norms={"input": NormSpec("input_layernorm", feeds=("q", "k", "v")),
               "post_attention": NormSpec("post_attention_layernorm", feeds=("gate", "up"))},
    ))"""


def register_arch(spec: ArchSpec, *aliases: str, overwrite: bool = False) -> ArchSpec:
    for name in (spec.model_type, *aliases):
        if name in _REGISTRY and not overwrite:
            raise ValueError(f"architecture {name!r} is already registered (pass overwrite=True to replace it)")
        _REGISTRY[name] = spec
    return spec


def supported_architectures() -> list[str]:
    return sorted(_REGISTRY)


def get_arch(model_or_config) -> ArchSpec:
    """The spec for a model (or its config), by ``config.model_type``."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    if model_type not in _REGISTRY:
        raise ValueError(
            f"effml does not know the architecture {model_type!r}. Supported: "
            f"{', '.join(supported_architectures())}.\n{_HOW_TO_REGISTER}"
        )
    return _REGISTRY[model_type]


def get_submodule(root: nn.Module, path: str) -> nn.Module:
    return root.get_submodule(path) if path else root


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    return get_submodule(model, get_arch(model).layers)
