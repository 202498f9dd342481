"""Input second moments of every block linear of the *original* model, for the activation-aware
LoRA init (``lora_init="asvd"``): the residual is factorised to be right where the inputs are
large, not uniformly over input channels.

Why: SmolLM2's layer 11 writes a ~24k "massive activation" into the residual stream through a
few MLP channels with huge inputs. A plain truncated SVD spends its rank on the residual's
Frobenius energy and loses that mechanism below rank ~384 of 576; weighting by the inputs keeps it.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..core.arch import get_arch, get_submodule
from ..core.calibrate import LayerwiseEngine
from ..core.hessian import Hessian
from ..core.validate import check_token_ids


@torch.no_grad()
def input_grams(model: nn.Module, calib: torch.Tensor, device=None, batch_size: int = 1) -> list[dict[str, torch.Tensor]]:
    """Per depth, ``{linear path: E[x xᵀ]}`` (float32, CPU) over the calibration tokens.

    Runs the layer-wise engine on the unmodified model (``propagate="original"``), so each
    block sees the original model's own inputs. Linears fed by the same tensor (q/k/v, gate/up)
    share one matrix.
    """
    calib = check_token_ids(calib, model, what="calib")
    arch = get_arch(model)
    grams: list[dict[str, torch.Tensor]] = []

    # linears behind the same norm read the same tensor (q/k/v, gate/up): one matrix for them
    paths = arch.linear_paths()
    source = {}
    for path in paths:
        role = next(r for r, p in arch.linears.items() if p == path)
        norm = arch.norm_feeding(role)
        source[path] = norm.path if norm is not None else path
    first = {src: next(p for p in paths if source[p] == src) for src in source.values()}

    def callback(ctx):
        mods = {p: get_submodule(ctx.block, p) for p in first.values()}
        acc = {p: Hessian(m.in_features, ctx.device) for p, m in mods.items()}
        with ctx.hooks(mods, lambda path, module, inp, out: acc[path].add(inp)):
            ctx.forward(keep=False)
        by_source = {source[p]: (acc[p].h / 2).float().cpu() for p in acc}  # Hessian holds 2/n Σ x xᵀ
        grams.append({p: by_source[source[p]] for p in paths})
        return None

    LayerwiseEngine(model, calib, device=device, batch_size=batch_size).run(
        callback, propagate="original", desc="recursify: input statistics")
    return grams
