"""QuaRot (Ashkboos et al., 2024): rotate activations with randomized Hadamard transforms so
outliers spread over all channels, then quantize with RTN or GPTQ.

Placement. The paper folds norm gains into the next linears and rotates the residual stream
offline, plus online Hadamards before down_proj, across heads before o_proj and on Q/K after
RoPE. Here each linear input gets its rotation online right after its norm, so the rotation
also holds for families whose norms scale block outputs (Gemma's post-attention /
post-feed-forward norms), which a residual rotation cannot pass through, and the norm gains
stay in the norms (``QuaRotConfig.fold_norms`` explains why). The cost is two extra small online
Kronecker products per block. Sizes that are not powers of two (576 = 24*24, 1536 = 32*48 in
SmolLM2, 9 heads) use ``hadamard.random_hadamard``: a Hadamard on the power-of-two part times
a small random orthogonal block.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core.arch import get_arch
from .api import register_method
from .apply import quantize_weights, set_activation_quant, set_kv_quant, wrap_linears
from .config import QuantConfig
from .hadamard import near_square_factors, random_hadamard
from .kv import install_attention_quant
from .rotate import block_of, fold_norm, input_groups, install_transform
from .transforms import KroneckerTransform


@dataclass
class QuaRotConfig(QuantConfig):
    """QuaRot defaults: activation clip 0.9, KV clip 0.95, MSE-searched weight clipping."""

    a_clip: float = 0.9
    kv_clip: float = 0.95
    w_mse: bool = True
    rotation_seed: int = 0
    rotate: bool = True  # False: quantizers only (an ablation)
    # The paper folds norm gains into the next linears so it can rotate the residual stream
    # offline. effml rotates each linear's input online, after the norm, so folding is not
    # needed, and it hurts: where a norm gain nearly closes a channel (Gemma-3 damps its
    # massive-activation channels this way), the rotated, folded weight's rounding error meets
    # the full, undamped channel. Gemma-3-270M W4A16, 2 x 512 test tokens: folded 2.2e13,
    # unfolded 54.6 (FP 33.2, RTN 164).
    fold_norms: bool = False


def _rotation(n: int, g: torch.Generator, heads: tuple[int, int] | None = None) -> KroneckerTransform:
    n1, n2 = heads if heads is not None else near_square_factors(n)
    return KroneckerTransform.from_factors(random_hadamard(n1, g).float(), random_hadamard(n2, g).float(), n)


# rotate=False (the ablation) at most folds norm gains into weight columns, which keeps zeros
@register_method("quarot", QuaRotConfig, preserves_sparsity=lambda cfg: not cfg.rotate,
                 prunable_after=lambda cfg: not cfg.rotate, recursive=False)
def quarot(model, cfg: QuaRotConfig, calib):
    arch = get_arch(model)
    info = arch.heads(model.config)
    wrap_linears(model)
    g = torch.Generator().manual_seed(cfg.rotation_seed)
    rotate = cfg.rotate
    n_layers = len(model.get_submodule(arch.layers))
    for i in range(n_layers):
        block = block_of(model, i)
        for norm_path, mods, kind in input_groups(block, i, arch, model.config):
            if norm_path is not None and cfg.fold_norms:
                fold_norm(block, norm_path, mods, arch)
            if not rotate:
                continue
            n = mods[0].in_features
            heads = (info.n_heads, info.head_dim) if kind == "heads" else None
            install_transform(mods, _rotation(n, g, heads))
    if rotate:
        for hooks in install_attention_quant(model, cfg.kv_bits, cfg.kv_bits, cfg.kv_sym, cfg.kv_clip):
            hooks.set_qk_transform(random_hadamard(info.head_dim, g).float())
    set_activation_quant(model, cfg)
    set_kv_quant(model, cfg)
    return {"rotated": rotate, **quantize_weights(model, cfg, calib)}
