"""Online input transforms (QuaRot / FlatQuant) as a compressed-tensors ``transform_config``.

effml keeps each transform as Kronecker factors (``KroneckerTransform``: ``x -> (x * s)(L ⊗ R)``);
the weights consuming it already hold its inverse, so only the online part is exported. Neither
compressed-tensors nor vLLM has a Kronecker transform, and vLLM takes one input transform per
(fused) linear, so each transform goes out as one dense ``[n, n]`` matrix ``T`` with
``y = x @ T``, one config group per set of linears sharing it (one per layer and site: q/k/v,
gate/up, o, down), location ``input``, not inverted. Per linear the checkpoint holds
``{linear}.{group}_input.weight`` (every linear of the group its own copy: no loader has to
resolve ties).

Scaling convention. compressed-tensors' ``HadamardTransform`` (types ``hadamard`` and
``random-hadamard``) computes ``x @ W / sqrt(n)`` from its stored ``W``; vLLM's transform module
divides every stored transform by ``sqrt(n)`` after loading and applies ``x @ W`` (dense path) or
its Hadamard kernel (type ``hadamard``). So the stored tensor is ``sqrt(n) · T`` and the type is

* ``hadamard`` when ``T`` is exactly the normalised Sylvester Hadamard (stored ``W`` = its ±1
  matrix, the library's own); effml's QuaRot never yields one (its rotations carry random signs
  and, for sizes that are not powers of two, a random orthogonal block);
* ``random-hadamard`` otherwise: the one dense type both readers scale alike (``random-matrix``
  is applied unscaled by compressed-tensors but divided by ``sqrt(n)`` by vLLM, so no stored
  tensor is right for both).

compressed-tensors builds a placeholder for each ``random-hadamard`` transform before the stored
one replaces it; it can only build sizes ``2^k · m`` with a known Hadamard of order ``m`` (1, 2
and multiples of 4 up to 256): other sizes are refused at export.

Carried exactly: the offline part (inverses merged into the weights, FlatQuant's per-channel
scales folded into norms / up_proj, P_v into v_proj), and every online input transform as above
(also a float linear's, folded into its weight: ``W Tᵀ``). Not carried:

* the Kronecker structure: each transform is a dense ``n x n`` matrix per linear, applied as a
  GEMM (SmolLM2-135M: 130M stored values, about the model's own size, 261 MB in bf16);
* activation quantization below 8 bits (W4A4, W4A8: no consumer), clipped or learned activation
  ranges (QuaRot's ``a_clip`` < 1, FlatQuant's ``lac``): refused; W8A8 needs ``w_bits=8``,
  per-channel weights and ``a_clip=1.0`` / ``lac=False``;
* integer KV-cache quantization: only with ``kv_cache="drop"``. The post-RoPE Q/K transform is
  then left out exactly: keys carry ``P`` and queries ``P^{-T}``, which cancel in ``q kᵀ`` for any
  invertible ``P`` (FlatQuant's ``P_h = U diag(s) Vᵀ`` is not orthogonal and still cancels).

Readers. transformers (5.24) does not apply ``transform_config`` (it reports the transform
tensors as unexpected); :func:`load_transforms` (used by ``effml.load_model``) applies it with
compressed-tensors' ``apply_transform_config`` and loads the stored matrices. vLLM 0.32 loads and
applies it (dense path for ``random-hadamard``), but its CPU build fails at the first forward:
``HadamardTransform.forward`` calls ``dispatch_unquantized_gemm()(self, ...)``, whose CPU variant
reads ``layer.cpu_linear``, which only linear layers get (``AttributeError: 'HadamardTransform'
object has no attribute 'cpu_linear'``); its CPU build has no Hadamard kernel either (type
``hadamard``), and its transform method asserts the linear has no bias.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from .schemes import SUPPORTED, UnsupportedScheme

LOCATION = "input"
# |sqrt(n) T - H| below this (float32 factors of ±1/sqrt(k)) means T is the Sylvester Hadamard
_HADAMARD_TOL = 1e-5


@dataclass
class TransformGroup:
    """One config group: the linears (by name) that share one online transform."""

    name: str
    modules: list[str]
    type: str  # "hadamard" or "random-hadamard"
    stored: torch.Tensor  # float64 [n, n]: sqrt(n) * T

    @property
    def size(self) -> int:
        return self.stored.shape[0]


def ct_constructible(n: int) -> bool:
    """Whether compressed-tensors (0.17 .. 0.20) can build a random Hadamard of size ``n``: its
    table holds orders 1, 2 and 4, 8, ..., 256, and it doubles them by Sylvester's rule."""
    odd = n
    while odd % 2 == 0:
        odd //= 2
    return n > 0 and (odd == 1 or (n % 4 == 0 and odd <= 64))


def _is_sylvester(stored: torch.Tensor) -> bool:
    from ..quant.hadamard import hadamard

    n = stored.shape[0]
    if n & (n - 1):
        return False
    return float((stored - hadamard(n).to(stored.device)).abs().max()) < _HADAMARD_TOL


def _group_name(first: str) -> str:
    # module names may not contain dots; named after the linear the transform is installed on
    return first.replace(".", "_")


def transform_groups(model: nn.Module, linears: list[str]) -> list[TransformGroup]:
    """The online input transforms of ``model``'s QuantLinears, grouped by shared parameters.

    Raises :class:`UnsupportedScheme` for a transform that is not effml's ``KroneckerTransform``
    or whose size compressed-tensors cannot load."""
    from ..quant.qlinear import QuantLinear
    from ..quant.transforms import KroneckerTransform

    by_key: dict[tuple, list[str]] = {}
    owner: dict[tuple, KroneckerTransform] = {}
    for name in linears:
        m = model.get_submodule(name)
        t = getattr(m, "input_transform", None) if isinstance(m, QuantLinear) else None
        if t is None:
            continue
        if not isinstance(t, KroneckerTransform):
            raise UnsupportedScheme(
                f"{name} has an online input transform of type {type(t).__name__}; only effml's KroneckerTransform "
                f"(QuaRot, FlatQuant) can be exported. Supported: {SUPPORTED}")
        # shared_copy() modules hold the same Parameter objects: one group
        key = tuple(id(p) if p is not None else None for p in (t.left, t.right, t.scale))
        by_key.setdefault(key, []).append(name)
        owner.setdefault(key, t)
    groups = []
    for key, names in by_key.items():
        t = owner[key]
        n = t.n1 * t.n2
        stored = t.dense().cpu() * math.sqrt(n)
        if _is_sylvester(stored):
            from ..quant.hadamard import hadamard

            groups.append(TransformGroup(_group_name(names[0]), names, "hadamard", hadamard(n)))
            continue
        if not ct_constructible(n):
            raise UnsupportedScheme(
                f"{names[0]}: its online transform has size {n}; compressed-tensors builds a random-hadamard "
                "transform (the dense form vLLM and compressed-tensors read alike) only for sizes 2^k * m with m "
                "1, 2 or a multiple of 4 up to 256, so its loader cannot take this one. Export the model quantized "
                f"without online transforms instead: {SUPPORTED}")
        groups.append(TransformGroup(_group_name(names[0]), names, "random-hadamard", stored))
    return groups


def weight_key(module: str, group: str) -> str:
    """Checkpoint name of a linear's transform: compressed-tensors registers the transform as the
    submodule ``{group}_{location}`` of the linear, vLLM likewise on the (fused) linear."""
    return f"{module}.{group}_{LOCATION}.weight"


def transform_tensors(groups: list[TransformGroup], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    out = {}
    for g in groups:
        w = g.stored.to(dtype).contiguous()
        for name in g.modules:
            out[weight_key(name, g.name)] = w
    return out


def _target(name: str) -> str:
    return f"re:^{name.replace('.', '[.]')}$"


def transform_config(groups: list[TransformGroup]) -> dict:
    """``quantization_config.transform_config`` (the TransformConfig schema of compressed-tensors
    0.17 and 0.20, which is the same)."""
    return {"config_groups": {
        g.name: {
            "type": g.type,
            "apply": [{"targets": [_target(n) for n in g.modules], "location": LOCATION, "inverse": False,
                       "ignore": []}],
            "randomize": False, "requires_grad": False, "head_dim": None, "precision": "torch.float32",
        } for g in groups}}


def notes(model: nn.Module, groups: list[TransformGroup]) -> list[str]:
    """What a reader of the export report must know about the exported transforms."""
    if not groups:
        return []
    n_params = sum(g.size ** 2 * len(g.modules) for g in groups)
    out = [f"{len(groups)} online input transforms written as dense transform_config groups "
           f"({', '.join(sorted({g.type for g in groups}))}; {n_params / 1e6:.1f}M stored values). transformers does "
           "not apply transform_config when loading: effml.load_model applies it (compressed-tensors' "
           "apply_transform_config, then the stored matrices); vLLM applies it itself"]
    out.append("vLLM 0.32's CPU build cannot run transform_config (its transform module lacks the cpu_linear that "
               "its CPU GEMM dispatch reads: AttributeError at the first forward); serve on a GPU build or in "
               "transformers")
    biased = [n for g in groups for n in g.modules if getattr(model.get_submodule(n), "bias", None) is not None]
    if biased:
        out.append(f"linears with a bias carry transforms ({biased[0]}, ...): vLLM 0.32's transform method asserts "
                   "bias is None (compressed_tensors/transform/linear.py), so only transformers serves this export")
    return out


def load_transforms(model: nn.Module, path: str | Path) -> nn.Module:
    """Apply the ``transform_config`` of the compressed-tensors folder ``path`` to ``model`` (loaded
    from it by transformers, which leaves the config unapplied) with compressed-tensors'
    ``apply_transform_config``, then load the stored transform matrices into it. A model that
    already holds compressed-tensors transforms is returned as is."""
    from compressed_tensors.transform import TransformConfig, apply_transform_config
    from compressed_tensors.transform.factory.base import TransformBase
    from safetensors import safe_open

    path = Path(path)
    q = json.loads((path / "config.json").read_text()).get("quantization_config") or {}
    tc = q.get("transform_config") or {}
    if not tc.get("config_groups"):
        return model
    if any(isinstance(m, TransformBase) for m in model.modules()):
        return model  # a transformers with transform support applied and loaded them already
    apply_transform_config(model, TransformConfig.model_validate(tc))
    index = path / "model.safetensors.index.json"
    if index.is_file():
        where = json.loads(index.read_text())["weight_map"]
    else:
        with safe_open(str(path / "model.safetensors"), framework="pt") as f:
            where = {k: "model.safetensors" for k in f.keys()}
    wanted = {f"{name}.weight": m for name, m in model.named_modules() if isinstance(m, TransformBase)}
    missing = sorted(k for k in wanted if k not in where)
    if missing:
        raise ValueError(f"{path}: transform_config names transforms the checkpoint lacks ({', '.join(missing[:3])})")
    by_file: dict[str, list[str]] = {}
    for k in wanted:
        by_file.setdefault(where[k], []).append(k)
    with torch.no_grad():
        for file, keys in by_file.items():
            with safe_open(str(path / file), framework="pt") as f:
                for k in keys:
                    w = wanted[k].weight
                    w.copy_(f.get_tensor(k).to(w.dtype))
    return model
