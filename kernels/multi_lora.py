"""Multi-LoRA matmul: every row of a batch gets the LoRA of its own depth, in one call.

In continuous depth-wise batching the rows that run a shared block together sit at different
loops, and each loop has its own LoRA on top of the shared weight. ``multi_lora`` adds
``scale * (x[i] @ A[d_i]^T) @ B[d_i]^T`` to the shared base output of each row ``i``:

* ``x``: ``[N, in]``; ``A``: ``[D, r, in]``; ``B``: ``[D, out, r]`` (depth-stacked LoRA factors,
  the layout of :class:`~effml.recursive.DepthLoRALinear`'s ``lora_A`` / ``lora_B``);
* ``depth_idx``: ``[N]`` integers in ``[0, D)``, or ``-1`` for a row without a LoRA;
* ``base``: optional ``[N, out]`` shared output the correction is added to.

Three implementations, same result:

* ``"triton"`` follows Punica's SGMV / S-LoRA (below); the default on CUDA tensors;
* ``"concat"`` is the paper's "concatenated LoRA" in plain torch: one shrink ``x @ [A_0; ...;
  A_{D-1}]^T`` for all rows, the other depths' rank columns zeroed, one expand. It spends D times
  the (small) rank FLOPs but makes 2 matmul calls instead of 2 per depth present; the default on
  CPU, where per-call overhead dominates at decode batch sizes;
* ``"torch"`` (:func:`multi_lora_reference`): one shrink/expand pair per depth present, on that
  depth's rows; the reference the tests compare against.

The Triton path: rows are stably sorted by depth, each depth's rows are cut into tiles of ``BLOCK_M`` rows (so ``tl.dot`` runs on rows that share one LoRA),
a *shrink* kernel writes ``x A^T`` for every tile into an fp32 ``[N, r]`` buffer and an *expand*
kernel multiplies it by ``B^T`` and adds it to the base. The tile table is built with tensor ops
only (no host sync), using the bound "at most ceil(N / BLOCK_M) + D tiles"; spare tiles are empty
and return at once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import has_triton

BLOCK_M = 16  # rows per tile; tl.dot needs >= 16
BACKENDS = ("auto", "triton", "concat", "torch")


def multi_lora(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, depth_idx: torch.Tensor, scale: float = 1.0,
               base: torch.Tensor | None = None, backend: str = "auto", validate: bool = True) -> torch.Tensor:
    """``base + scale * (x A[d]^T) B[d]^T`` row by row (``base`` defaults to zeros); a new tensor.

    ``backend``: ``"triton"``, ``"concat"``, ``"torch"`` or ``"auto"`` (Triton for CUDA tensors,
    concat otherwise); see the module docstring. ``"triton"`` on CPU tensors needs the kernels
    imported under ``TRITON_INTERPRET=1`` (the interpreter; slow, for tests). ``validate=False``
    skips the depth-range check, which reads ``depth_idx`` back to the host (a sync on GPU).
    """
    _check(x, A, B, depth_idx, base, validate)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = "triton" if x.is_cuda and has_triton() else "concat"
    if backend == "triton":
        return _multi_lora_triton(x, A, B, depth_idx, scale, base)
    if backend == "concat":
        return multi_lora_concat(x, A, B, depth_idx, scale, base)
    return multi_lora_reference(x, A, B, depth_idx, scale, base)


def multi_lora_concat(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, depth_idx: torch.Tensor,
                      scale: float = 1.0, base: torch.Tensor | None = None,
                      B_cat: torch.Tensor | None = None) -> torch.Tensor:
    """All depths' LoRAs as one rank-``D*r`` LoRA, with each row keeping only its depth's ``r``
    shrink outputs (the others are multiplied by 0, so they add exact zeros to the expand).
    ``B_cat``: ``B`` laid out as ``[out, D*r]`` (``B.permute(1, 0, 2).reshape(out, -1)``), to
    skip that copy when the caller keeps one."""
    D, r, d_in = A.shape
    if B_cat is None:
        B_cat = B.permute(1, 0, 2).reshape(B.shape[1], D * r)
    s = F.linear(x, A.reshape(D * r, d_in))
    keep = torch.arange(D * r, device=x.device)[None, :] // r == depth_idx[:, None]
    delta = F.linear(s.masked_fill(~keep, 0.0), B_cat)
    if scale != 1.0:
        delta = scale * delta
    return delta if base is None else base + delta


def multi_lora_reference(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, depth_idx: torch.Tensor,
                         scale: float = 1.0, base: torch.Tensor | None = None) -> torch.Tensor:
    """Plain-torch multi-LoRA: one shrink/expand ``F.linear`` pair per depth present in the batch.

    When every row has the same depth this is exactly ``DepthLoRALinear``'s own arithmetic."""
    out = torch.zeros(x.shape[0], B.shape[1], dtype=x.dtype, device=x.device) if base is None else base.clone()
    depths = depth_idx.unique().tolist()
    if len(depths) == 1 and depths[0] >= 0:  # one group: no gather / scatter
        delta = F.linear(F.linear(x, A[depths[0]]), B[depths[0]])
        return out + (delta if scale == 1.0 else scale * delta)
    for d in depths:
        if d < 0:
            continue
        rows = (depth_idx == d).nonzero().squeeze(1)
        delta = F.linear(F.linear(x[rows], A[d]), B[d])
        out[rows] += delta if scale == 1.0 else scale * delta
    return out


def _check(x, A, B, depth_idx, base, validate: bool) -> None:
    if x.dim() != 2 or A.dim() != 3 or B.dim() != 3:
        raise ValueError(f"expected x [N, in], A [D, r, in], B [D, out, r]; got {tuple(x.shape)}, {tuple(A.shape)}, "
                         f"{tuple(B.shape)}")
    n, d_in = x.shape
    D, r, a_in = A.shape
    if a_in != d_in or B.shape[0] != D or B.shape[2] != r:
        raise ValueError(f"shapes do not chain: x {tuple(x.shape)}, A {tuple(A.shape)} (want [D, r, {d_in}]), "
                         f"B {tuple(B.shape)} (want [{D}, out, {r}])")
    if depth_idx.shape != (n,) or depth_idx.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"depth_idx must be an int32/int64 tensor of shape ({n},), got {depth_idx.dtype} "
                         f"{tuple(depth_idx.shape)}")
    if not (x.dtype == A.dtype == B.dtype):
        raise ValueError(f"x, A and B must share a dtype, got {x.dtype}, {A.dtype}, {B.dtype}")
    if base is not None and (base.shape != (n, B.shape[1]) or base.dtype != x.dtype):
        raise ValueError(f"base must be [{n}, {B.shape[1]}] of dtype {x.dtype}, got {tuple(base.shape)} {base.dtype}")
    if validate and n and (int(depth_idx.min()) < -1 or int(depth_idx.max()) >= D):
        raise ValueError(f"depth_idx values must be in [-1, {D}) (-1 = no LoRA), got range "
                         f"[{int(depth_idx.min())}, {int(depth_idx.max())}]")


# --- Triton -------------------------------------------------------------------------------------
def _tiles(depth_idx: torch.Tensor, num_depths: int, block_m: int):
    """Row order and tile table: tile t covers ``order[start[t] : start[t] + length[t]]``, all of
    depth ``depth[t]``; tiles past the last real one have length 0. Tensor ops only."""
    n = depth_idx.shape[0]
    key = torch.where(depth_idx >= 0, depth_idx.long(), num_depths)  # rows without a LoRA sort last
    order = torch.argsort(key, stable=True).to(torch.int32)
    counts = torch.bincount(key, minlength=num_depths + 1)[:num_depths]
    seg_start = torch.cumsum(counts, 0) - counts
    per_depth = (counts + block_m - 1) // block_m
    tile_end = torch.cumsum(per_depth, 0)
    num_tiles = (n + block_m - 1) // block_m + num_depths
    t = torch.arange(num_tiles, device=depth_idx.device)
    depth = torch.searchsorted(tile_end, t, right=True)
    used = depth < num_depths
    depth = depth.clamp(max=num_depths - 1)
    local = t - (tile_end - per_depth)[depth]
    start = seg_start[depth] + local * block_m
    length = torch.where(used, (counts[depth] - local * block_m).clamp(0, block_m), 0)
    return order, depth.to(torch.int32), start.to(torch.int32), length.to(torch.int32), num_tiles


def _next_pow2(v: int, low: int = 16, high: int | None = None) -> int:
    p = low
    while p < v and (high is None or p < high):
        p *= 2
    return p


def _multi_lora_triton(x, A, B, depth_idx, scale, base):
    if not has_triton():
        raise RuntimeError("backend='triton' needs the triton package; use backend='torch'")
    from ._multi_lora_triton import expand_kernel, shrink_kernel
    from .launch import check_device

    check_device(shrink_kernel, x, A, B, depth_idx)
    n, d_in = x.shape
    D, r, _ = A.shape
    d_out = B.shape[1]
    out = torch.zeros(n, d_out, dtype=x.dtype, device=x.device) if base is None else base.clone()
    if n == 0 or r == 0:
        return out
    order, t_depth, t_start, t_len, num_tiles = _tiles(depth_idx, D, BLOCK_M)
    block_r = _next_pow2(r, high=64)
    block_k = _next_pow2(d_in, high=64)
    block_n = _next_pow2(d_out, high=64)
    prec = "ieee" if x.dtype == torch.float32 else "tf32"  # 16-bit inputs ignore it; fp32 stays exact-ish
    shrunk = torch.empty(n, r, dtype=torch.float32, device=x.device)
    shrink_kernel[(num_tiles, _cdiv(r, block_r))](
        x, A, shrunk, order, t_depth, t_start, t_len, d_in, r,
        x.stride(0), x.stride(1), A.stride(0), A.stride(1), A.stride(2), shrunk.stride(0), shrunk.stride(1),
        BLOCK_M=BLOCK_M, BLOCK_R=block_r, BLOCK_K=block_k, PREC=prec,
    )
    expand_kernel[(num_tiles, _cdiv(d_out, block_n))](
        shrunk, B, out, order, t_depth, t_start, t_len, r, d_out, float(scale),
        shrunk.stride(0), shrunk.stride(1), B.stride(0), B.stride(1), B.stride(2), out.stride(0), out.stride(1),
        BLOCK_M=BLOCK_M, BLOCK_R=block_r, BLOCK_N=block_n, PREC=prec,
    )
    return out


def _cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b
