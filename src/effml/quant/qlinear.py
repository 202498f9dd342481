"""QuantLinear: integer weights stored packed, activations fake-quantized per token."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core.io import register_module_type
from ..kernels.dispatch import keep_dense_cache
from ..kernels.dispatch import linear_forward as kernel_linear
from .act import ActQuantizer
from .quantizers import (
    check_bits,
    dequantize_weight,
    pack_codes,
    quantize_weight,
    unpack_codes,
    weight_qparams,
)


@register_module_type
class QuantLinear(nn.Module):
    """``y = Q_a(T(x)) @ deq(W_q)ᵀ + b``.

    * ``input_transform`` T (optional): an online transform; the stored weight already holds
      its inverse.
    * ``act_quant`` Q_a (optional): per-token activation quantizer.
    * weights: with ``w_bits < 16`` the integer codes are stored packed (two per byte up to
      4 bits) with float16 scales (and uint8 zero points when asymmetric), per output channel
      or per group of ``group_size`` inputs. With ``w_bits == 16`` a float ``weight`` is kept,
      which is also the state while a method is still calibrating.

    On CUDA (or inside ``effml.kernels.use_kernels("triton")``) supported layers run on the Triton
    kernels of ``effml.kernels``, which read ``qweight`` in place as [out, in/2]; on CPU on
    PyTorch's integer kernels, which read 8-bit symmetric ``qweight`` in place as int8 [out, in]
    and otherwise use their packed copy built once in ``_kernel_cache`` (never saved); see
    ``effml.kernels.dispatch``. The torch path below is the reference.

    No dense float weight is kept: :meth:`dequantized_weight` computes it on demand, unless
    ``keep_dense`` is ``True`` (or ``None`` and ``effml.kernels.keep_dense_cache(True)`` is set).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, w_bits: int = 16, w_sym: bool = True,
                 group_size: int | None = None, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.w_bits = check_bits(w_bits, "w_bits")
        self.w_sym = w_sym
        if group_size is not None and (group_size < 1 or in_features % group_size):
            raise ValueError(
                f"group_size={group_size} does not divide in_features={in_features}: use a divisor of it or None"
            )
        self.group_size = group_size
        self.dtype_name = str(dtype).removeprefix("torch.")
        self.input_transform: nn.Module | None = None
        self.act_quant: ActQuantizer | None = None
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype)) if bias else None
        if self.w_bits >= 16:
            self.weight = nn.Parameter(torch.zeros(out_features, in_features, dtype=dtype))
        else:
            self.weight = None
            n = in_features * out_features
            n_bytes = (n + 1) // 2 if self.w_bits <= 4 else n
            groups = 1 if group_size is None else in_features // group_size
            self.register_buffer("qweight", torch.zeros(n_bytes, dtype=torch.uint8))
            self.register_buffer("scales", torch.ones(out_features, groups, dtype=torch.float16))
            if not w_sym:
                self.register_buffer("zeros", torch.zeros(out_features, groups, dtype=torch.uint8))
        self._deq: torch.Tensor | None = None
        self.keep_dense: bool | None = None  # None: follow effml.kernels.keep_dense_cache()

    # --- construction ---------------------------------------------------------------------
    @classmethod
    def from_linear(cls, linear: nn.Linear) -> QuantLinear:
        """A float (16-bit) QuantLinear with the same weight and bias (shared, not copied)."""
        q = cls(linear.in_features, linear.out_features, linear.bias is not None, dtype=linear.weight.dtype)
        q.weight = linear.weight
        if linear.bias is not None:
            q.bias = linear.bias
        return q

    def set_quantized_weight(self, weight: torch.Tensor, bits: int, sym: bool = True, group_size: int | None = None,
                             scale: torch.Tensor | None = None, zero: torch.Tensor | None = None,
                             mse: bool = False) -> torch.Tensor:
        """Store ``weight`` as integers (qparams computed by RTN unless given); returns the
        dequantized weight. ``bits == 16`` keeps it in floating point."""
        check_bits(bits, "w_bits")
        if group_size is not None and self.in_features % group_size:
            raise ValueError(
                f"group_size={group_size} does not divide in_features={self.in_features}: use a divisor of it or None"
            )
        weight = weight.detach()
        self.w_bits, self.w_sym, self.group_size = bits, sym, group_size
        for name in ("qweight", "scales", "zeros"):
            self._buffers.pop(name, None)
        self._deq = None
        if bits >= 16:
            self.weight = nn.Parameter(weight.clone(), requires_grad=False)
            return self.weight
        if scale is None:
            scale, zero = weight_qparams(weight, bits, sym, group_size, mse=mse)
        codes = quantize_weight(weight, scale, zero, bits, sym, group_size)
        self.weight = None
        self.register_buffer("qweight", pack_codes(codes, bits).to(weight.device))
        self.register_buffer("scales", scale.to(torch.float16).to(weight.device))
        if not sym:
            self.register_buffer("zeros", zero.to(torch.uint8).to(weight.device))
        return self.dequantized_weight()

    # --- use -------------------------------------------------------------------------------
    def dequantized_weight(self) -> torch.Tensor:
        if self.weight is not None:
            return self.weight
        if self._deq is not None and self._deq.device == self.qweight.device:
            return self._deq
        codes = unpack_codes(self.qweight, self.w_bits, (self.out_features, self.in_features))
        zero = self.zeros.float() if not self.w_sym else torch.zeros_like(self.scales, dtype=torch.float32)
        w = dequantize_weight(codes, self.scales.float(), zero, self.w_bits, self.w_sym, self.group_size)
        w = w.to(getattr(torch, self.dtype_name))
        keep = self.__dict__.get("keep_dense")
        # cached only on request: a dense copy would cost 4-8x the packed bytes for every layer
        if keep or (keep is None and keep_dense_cache()):
            self._deq = w
        return w

    def _apply(self, fn, *args, **kwargs):
        self._deq = None  # moved or cast: rebuild the dequantized cache lazily
        self.__dict__.pop("_kernel_cache", None)  # and the kernels' copies of scales / factors
        self.__dict__.pop("_kernel_cpu_failed", None)
        return super()._apply(fn, *args, **kwargs)

    def prepare_input(self, x: torch.Tensor) -> torch.Tensor:
        """What the weight actually multiplies: the transformed, quantized activation."""
        if self.input_transform is not None:
            x = self.input_transform(x)
        if self.act_quant is not None:
            x = self.act_quant(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Triton kernels on CUDA (or when forced with effml.kernels.use_kernels); None = torch path
        y = kernel_linear(self, x)
        if y is not None:
            return y
        x = self.prepare_input(x)
        w = self.dequantized_weight()
        return F.linear(x, w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    # --- accounting and persistence --------------------------------------------------------
    def effml_storage(self) -> tuple[int, int]:
        """(parameters, stored bytes): the weight's codes, scales and zeros plus the float bias."""
        n = self.in_features * self.out_features
        bias = (0, 0) if self.bias is None else (self.bias.numel(), self.bias.numel() * self.bias.element_size())
        if self.weight is not None:
            return n + bias[0], n * self.weight.element_size() + bias[1]
        stored = self.qweight.numel() + self.scales.numel() * 2 + (0 if self.w_sym else self.zeros.numel())
        return n + bias[0], stored + bias[1]

    def extra_repr(self) -> str:
        g = "channel" if self.group_size is None else f"group{self.group_size}"
        return (f"in={self.in_features}, out={self.out_features}, w_bits={self.w_bits}, "
                f"{'sym' if self.w_sym else 'asym'}/{g}, bias={self.bias is not None}")

    def effml_spec(self) -> dict:
        return {"in_features": self.in_features, "out_features": self.out_features, "bias": self.bias is not None,
                "w_bits": self.w_bits, "w_sym": self.w_sym, "group_size": self.group_size, "dtype": self.dtype_name}

    @classmethod
    def effml_build(cls, spec: dict) -> QuantLinear:
        spec = dict(spec)
        dtype = getattr(torch, spec.pop("dtype"))
        return cls(**spec, dtype=dtype)
