"""Uniform integer quantizers: weights (per channel / per group), activations (per token), STE.

Conventions (GPTQ / QuaRot / FlatQuant):

* symmetric b-bit: ``scale = absmax / (2^(b-1) - 1)``, codes in ``[-2^(b-1), 2^(b-1) - 1]``;
  symmetric *weights* may instead use the reference GPTQ / compressed-tensors grid
  (``grid="minmax15"``): ``scale = 2 absmax / (2^b - 1)`` (absmax / 7.5 at 4 bits), same codes,
  all ``2^b`` of them used (``±absmax`` sit at ``±7.5`` codes: rounded and clipped to -8 / +7; see
  :data:`SYM_GRIDS`);
* asymmetric b-bit: ``scale = (max - min) / (2^b - 1)``, ``zero = round(-min / scale)``, codes in
  ``[0, 2^b - 1]``; the range is first widened to include 0 so zero is exactly representable.

Stored codes are always unsigned (symmetric codes are offset by ``2^(b-1)``) so that 2..4-bit
codes pack two per byte the same way.
"""

from __future__ import annotations

import torch

MIN_BITS, MAX_BITS = 2, 8
_EPS = 1e-8
# symmetric weight grids: "absmax7" scale = absmax / (2^(b-1) - 1) (codes -7..7 used, -8 unused);
# "minmax15" scale = 2 absmax / (2^b - 1), the grid of the reference GPTQ code and of
# compressed-tensors / llm-compressor (all 2^b codes used, +absmax rounds to the top code)
SYM_GRIDS = ("absmax7", "minmax15")


def check_grid(grid: str) -> str:
    if grid not in SYM_GRIDS:
        raise ValueError(f"symmetric weight grid must be one of {SYM_GRIDS}, got {grid!r}")
    return grid


def check_bits(bits: int, what: str = "bits", allow_16: bool = True) -> int:
    """Bits must be 2..8 (16 means "leave in floating point" where ``allow_16``)."""
    if isinstance(bits, bool) or not isinstance(bits, int):
        raise ValueError(f"{what} must be an int, got {bits!r}")
    if allow_16 and bits == 16:
        return bits
    if not MIN_BITS <= bits <= MAX_BITS:
        extra = " or 16 (no quantization)" if allow_16 else ""
        raise ValueError(f"{what}={bits} is not supported: use {MIN_BITS}..{MAX_BITS}{extra}")
    return bits


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round in the forward pass, identity gradient in the backward pass."""
    return (x.round() - x).detach() + x


def qrange(bits: int, sym: bool) -> tuple[int, int]:
    if sym:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def scale_zero(
    xmin: torch.Tensor, xmax: torch.Tensor, bits: int, sym: bool, grid: str = "absmax7"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point from per-row ranges (differentiable in ``xmin``/``xmax``).
    ``grid`` (symmetric only): see :data:`SYM_GRIDS`."""
    if sym:
        absmax = torch.maximum(xmax.abs(), xmin.abs())
        levels = (2**bits - 1) / 2 if check_grid(grid) == "minmax15" else 2 ** (bits - 1) - 1
        scale = (absmax / levels).clamp_min(_EPS)
        return scale, torch.zeros_like(scale)
    xmin = torch.clamp(xmin, max=0.0)
    xmax = torch.clamp(xmax, min=0.0)
    scale = ((xmax - xmin) / (2**bits - 1)).clamp_min(_EPS)
    zero = torch.round(-xmin / scale).detach()
    return scale, zero


def fake_quant_rows(
    x: torch.Tensor, bits: int, sym: bool, clip: torch.Tensor | float = 1.0, ste: bool = False
) -> torch.Tensor:
    """Quantize-dequantize each row (last dim) of ``x`` with its own range scaled by ``clip``.

    This is per-token quantization for activations and per-(token, head) for K/V when the last
    dim is head_dim. ``clip`` may be a learnable tensor (activation clipping); with ``ste`` the
    rounding passes gradients straight through.
    """
    if bits >= 16:
        return x
    xmax = x.amax(dim=-1, keepdim=True) * clip
    xmin = x.amin(dim=-1, keepdim=True) * clip
    scale, zero = scale_zero(xmin, xmax, bits, sym)
    lo, hi = qrange(bits, sym)
    rnd = round_ste if ste else torch.round
    q = torch.clamp(rnd(x / scale) + zero, lo, hi)
    return (q - zero) * scale


def _grouped(w: torch.Tensor, group_size: int | None) -> torch.Tensor:
    out_f, in_f = w.shape
    g = in_f if group_size is None else group_size
    if in_f % g:
        raise ValueError(f"group_size={g} does not divide the input dimension {in_f}: use a divisor of {in_f} or None")
    return w.reshape(out_f, in_f // g, g)


def weight_qparams(
    w: torch.Tensor, bits: int, sym: bool = True, group_size: int | None = None, mse: bool = False,
    clip: torch.Tensor | float = 1.0, grid: str = "absmax7", fp16_scales: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per output channel (``group_size=None``) or per group ``scale`` and ``zero``, shape
    ``[out, n_groups]``. Scales are rounded to float16 because that is how QuantLinear stores
    them; ``fp16_scales=False`` keeps float32 scales (only for fake-quantized experiments: a
    QuantLinear rounds them to float16 when it stores them). ``grid``: the symmetric grid
    (:data:`SYM_GRIDS`).

    ``mse``: shrink each row's range over a grid (1.0 down to 0.2) and keep the shrink with the
    lowest ``|err|^2.4`` (the GPTQ/QuaRot weight-clipping search). ``clip`` scales the range.
    """
    rnd = (lambda t: t.half().float()) if fp16_scales else (lambda t: t)
    wg = _grouped(w.float(), group_size)
    xmin, xmax = wg.amin(-1) * clip, wg.amax(-1) * clip
    scale, zero = scale_zero(xmin, xmax, bits, sym, grid)
    if mse:
        best = torch.full_like(scale, float("inf"))
        lo, hi = qrange(bits, sym)
        for p in torch.linspace(1.0, 0.2, 81):
            s, z = scale_zero(xmin * p, xmax * p, bits, sym, grid)
            s = rnd(s).clamp_min(_EPS)
            q = torch.clamp(torch.round(wg / s[..., None]) + z[..., None], lo, hi)
            err = ((q - z[..., None]) * s[..., None] - wg).abs().pow(2.4).sum(-1)
            better = err < best
            best = torch.where(better, err, best)
            scale = torch.where(better, s, scale)
            zero = torch.where(better, z, zero)
    scale = rnd(scale).clamp_min(_EPS)
    if not sym:
        zero = torch.clamp(zero, 0, 2**bits - 1)
    return scale, zero


def quantize_weight(
    w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, sym: bool, group_size: int | None = None
) -> torch.Tensor:
    """Unsigned integer codes (uint8, one per element) of ``w`` for the given qparams."""
    wg = _grouped(w.float(), group_size)
    lo, hi = qrange(bits, sym)
    q = torch.clamp(torch.round(wg / scale[..., None]) + zero[..., None], lo, hi)
    if sym:
        q = q - lo  # offset to unsigned
    return q.reshape(w.shape).to(torch.uint8)


def dequantize_weight(
    codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, sym: bool, group_size: int | None = None
) -> torch.Tensor:
    q = _grouped(codes.float(), group_size)
    if sym:
        q = q + qrange(bits, sym)[0]
    return ((q - zero[..., None]) * scale[..., None]).reshape(codes.shape)


def fake_quant_weight(
    w: torch.Tensor, bits: int, sym: bool = True, group_size: int | None = None, mse: bool = False,
    grid: str = "absmax7",
) -> torch.Tensor:
    """Round-to-nearest quantize-dequantize of a weight matrix ``[out, in]``."""
    if bits >= 16:
        return w
    scale, zero = weight_qparams(w, bits, sym, group_size, mse, grid=grid)
    codes = quantize_weight(w, scale, zero, bits, sym, group_size)
    return dequantize_weight(codes, scale, zero, bits, sym, group_size).to(w.dtype)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes of up to 4 bits go two per byte (even index in the low nibble); wider ones one per byte.

    8-bit codes are stored as ``code ^ 0x80``: for symmetric codes (``code = q + 128``) the stored
    bytes read as int8 are ``q`` itself, so the CPU integer kernels use ``qweight`` in place
    instead of keeping a signed copy. 5..7-bit codes are stored as they are (their signed values
    need a separate int8 copy anyway). The byte layout is private: read codes with
    :func:`unpack_codes`.
    """
    flat = codes.reshape(-1).to(torch.uint8)
    if bits == 8:
        return flat ^ 0x80  # a new tensor: never aliases the caller's codes
    if bits > 4:
        return flat.clone()
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    pairs = flat.view(-1, 2)
    return (pairs[:, 0] | (pairs[:, 1] << 4)).contiguous()


def unpack_codes(packed: torch.Tensor, bits: int, shape: tuple[int, ...]) -> torch.Tensor:
    """The unsigned codes (uint8, ``shape``) that :func:`pack_codes` stored in ``packed``."""
    n = 1
    for s in shape:
        n *= s
    if bits == 8:
        return (packed[:n] ^ 0x80).reshape(shape)
    if bits > 4:
        return packed[:n].reshape(shape)
    out = torch.stack([packed & 0x0F, packed >> 4], dim=-1).reshape(-1)
    return out[:n].reshape(shape)
