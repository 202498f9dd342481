"""Which compressed-tensors scheme each quantized linear maps to, and the ``quantization_config``.

Supported (everything else is refused before any file is written, with this list):

* weight-only, 2..8 bits, per channel or per group, symmetric or asymmetric (RTN / GPTQ, with or
  without act-order): ``pack-quantized``;
* W8A8: 8-bit symmetric per-channel weights with dynamic symmetric per-token int8 activations
  (SmoothQuant, or RTN / GPTQ with ``a_bits=8``): ``int-quantized``;
* either of them behind an online input transform (QuaRot, FlatQuant): a dense
  ``transform_config`` group per layer and site (see :mod:`effml.export.transforms`).

effml's GPTQ act-order uses static groups: each stored group keeps one scale in the original
column order, so the group of column ``j`` is ``j // group_size`` and no ``weight_g_idx`` (nor
``actorder``) is written: the checkpoint is an ordinary grouped one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

SUPPORTED = (
    "weight-only W2..W8 A16 (RTN or GPTQ; per channel or group; sym or asym; act-order) -> pack-quantized; "
    "W8A8 (8-bit symmetric per-channel weights, dynamic symmetric per-token int8 activations, no activation "
    "clipping: SmoothQuant, RTN or GPTQ with a_bits=8) -> int-quantized; either behind QuaRot / FlatQuant online "
    "transforms -> + transform_config (dense per layer); unquantized (optionally pruned) -> dense"
)


@dataclass(frozen=True)
class Scheme:
    """One linear's storage: ``w_bits`` 2..8, ``group_size`` None = per channel, ``a_bits`` 16 or 8."""

    w_bits: int
    w_sym: bool
    group_size: int | None
    a_bits: int = 16

    @property
    def format(self) -> str:
        return "int-quantized" if self.a_bits == 8 else "pack-quantized"

    @property
    def name(self) -> str:
        g = "channel" if self.group_size is None else f"g{self.group_size}"
        return f"W{self.w_bits}A{self.a_bits} {'sym' if self.w_sym else 'asym'} {g}"

    def to_dict(self, targets: list[str]) -> dict:
        weights = {
            "num_bits": self.w_bits, "type": "int", "symmetric": self.w_sym,
            "group_size": self.group_size, "strategy": "channel" if self.group_size is None else "group",
            "block_structure": None, "dynamic": False, "actorder": None,
            "observer": "minmax", "observer_kwargs": {},
        }
        acts = None
        if self.a_bits == 8:
            acts = {
                "num_bits": 8, "type": "int", "symmetric": True, "group_size": None, "strategy": "token",
                "block_structure": None, "dynamic": True, "actorder": None, "observer": None, "observer_kwargs": {},
            }
        return {"targets": targets, "weights": weights, "input_activations": acts,
                "output_activations": None, "format": self.format}


class UnsupportedScheme(ValueError):
    """A model whose compression has no compressed-tensors form."""


def linear_scheme(name: str, m: nn.Module) -> Scheme | None:
    """The scheme of an effml ``QuantLinear`` (None: left in floating point)."""
    act = m.act_quant
    a_bits = 16 if act is None or act.bits >= 16 else act.bits
    if a_bits == 16:
        return None if m.w_bits >= 16 else Scheme(m.w_bits, m.w_sym, m.group_size)
    if a_bits == 8 and act.sym and act.clip == 1.0 and not act.learnable \
            and m.w_bits == 8 and m.w_sym and m.group_size is None:
        return Scheme(8, True, None, 8)
    how = f"W{m.w_bits}A{a_bits} ({'sym' if m.w_sym else 'asym'} weights, group {m.group_size}, " \
          f"{'sym' if act.sym else 'asym'} activations clipped to {act.clip}{', learned' if act.learnable else ''})"
    hint = ""
    if a_bits == 4:
        hint = " Integer W4A4 has no consumer in transformers or vLLM."
    if m.input_transform is not None:
        # QuaRot / FlatQuant: what their settings must be for an exportable activation scheme
        hint += (" QuaRot / FlatQuant models export with a_bits=16 (any weight bits), or W8A8 with w_bits=8, "
                 "group_size=None, a_clip=1.0 (QuaRot defaults to 0.9) and, for FlatQuant, lac=False.")
    raise UnsupportedScheme(f"{name} is {how}: compressed-tensors cannot carry it.{hint} Supported: {SUPPORTED}")


def quantization_config(schemes: dict[str, Scheme], all_linears: list[str], version: str,
                        sparsity: dict | None, transforms: dict | None = None) -> dict | None:
    """``config.json``'s ``quantization_config`` (None for an unquantized, unpruned model).

    One config group per distinct scheme. When one scheme covers every decoder linear the group
    targets ``Linear`` and ignores the rest (lm_head), the form vLLM and llm-compressor use;
    otherwise each group lists its modules by exact name.
    """
    if not schemes and sparsity is None:
        return None
    distinct = sorted(set(schemes.values()), key=lambda s: s.name)
    floating = [n for n in all_linears if n not in schemes]
    groups = {}
    if len(distinct) == 1:
        groups["group_0"] = distinct[0].to_dict(["Linear"])
        ignore = ["lm_head", *floating]
    else:
        for i, s in enumerate(distinct):
            names = [n for n, t in schemes.items() if t == s]
            groups[f"group_{i}"] = s.to_dict([f"re:^{n.replace('.', '[.]')}$" for n in names])
        ignore = ["lm_head"]
    formats = {s.format for s in distinct}
    fmt = "dense" if not formats else formats.pop() if len(formats) == 1 else "mixed-precision"
    extra = {}
    if any(not s.w_sym and s.format == "pack-quantized" for s in distinct):
        # transformers (5.24) + compressed-tensors (0.20) build packed asymmetric zero points at their
        # unpacked shape when loading compressed and then refuse the checkpoint; dequantizing on load
        # (a transformers-only key, ignored by compressed-tensors and vLLM) reads them correctly.
        extra["dequantize"] = True
    return {
        "quant_method": "compressed-tensors", "version": version, "format": fmt,
        "quantization_status": "compressed", "config_groups": groups, "ignore": ignore,
        "kv_cache_scheme": None, "global_compression_ratio": None,
        "sparsity_config": sparsity or {}, "transform_config": transforms or {}, **extra,
    }
