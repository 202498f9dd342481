"""compressed-tensors' integer packing, written out so that exporting needs no extra package.

Codes are stored offset by ``2^(b-1)`` (unsigned, ``0 .. 2^b - 1``), which is exactly effml's
stored code for both symmetric and asymmetric weights (see :mod:`effml.quant.quantizers`).
32 consecutive codes fill exactly ``b`` int32 words, element ``j`` at bits ``[b*j, b*j + b)``
least significant first, values split across word boundaries for 3/5/6/7 bits (dense packing of
compressed-tensors >= 0.20; for 2, 4 and 8 bits it coincides with the older one-word-per-
``32/b``-values packing that earlier readers such as vLLM's pinned 0.17 use).
"""

from __future__ import annotations

import math

import torch


def pack_int32(codes: torch.Tensor, bits: int, dim: int = 1) -> torch.Tensor:
    """Pack unsigned ``codes`` (``[rows, cols]``, values ``< 2^bits``) along ``dim`` into int32."""
    if not 1 <= bits <= 8:
        raise ValueError(f"packing supports 1..8 bits, got {bits}")
    v = codes.to(torch.int64)
    if dim == 0:
        v = v.T
    if v.numel() and (int(v.min()) < 0 or int(v.max()) >= 2**bits):
        raise ValueError(f"codes out of range for {bits} bits")
    rows, cols = v.shape
    n_words = math.ceil(cols * bits / 32)
    padded = math.ceil(cols / 32) * 32
    v = torch.nn.functional.pad(v, (0, padded - cols)).reshape(rows, padded // 32, 32)
    # bit position of every element inside its block of `bits` words
    start = torch.arange(32, dtype=torch.int64) * bits
    word, off = start // 32, start % 32
    out = torch.zeros(rows, padded // 32, bits, dtype=torch.int64)
    out.scatter_add_(2, word.expand(rows, padded // 32, 32), (v << off) & 0xFFFFFFFF)
    spill = off + bits > 32  # high bits that continue in the next word
    if spill.any():
        hi = v[..., spill] >> (32 - off[spill])
        out.scatter_add_(2, (word[spill] + 1).expand(rows, padded // 32, int(spill.sum())), hi)
    out = out.reshape(rows, -1)[:, :n_words]
    # reinterpret the unsigned 32-bit words as int32
    out = torch.where(out >= 2**31, out - 2**32, out).to(torch.int32)
    return (out.T if dim == 0 else out).contiguous()
