"""When a QuantLinear runs on the Triton kernels, and what it hands them.

Modes (``use_kernels(mode)``, a context manager; the default is ``"auto"``):

* ``"auto"``: kernels for inputs on a CUDA device when Triton is installed, torch elsewhere;
* ``"triton"``: kernels wherever the layer is supported (CPU tensors need ``TRITON_INTERPRET=1``
  set before the kernels are first used: this is how the tests run them);
* ``"torch"``: always QuantLinear's reference torch path.

Paths: ``"w4a4"`` (weights <= 4-bit, symmetric per channel, activations <= 4-bit symmetric
per token): fused transform + quantize, then the int4 GEMM. ``"w4a16"`` (weights <= 4-bit in any
QuantLinear layout, no activation quantizer): the online transform in torch, then the weight-only
GEMM. Anything else (asymmetric activations, 5..8-bit weights, grouped W4A4, odd sizes, float
weights) stays on the torch path. Kernels are inference-only: while autograd records (the input
needs a gradient, or a quantizer is in straight-through calibration mode) the torch path runs.

The kernels read QuantLinear's own packed buffer (``qweight`` viewed as [out, in/2]); the
per-module cache only holds float32 copies of the small tensors (scales, bias, transform factors)
and the clip ratio as a Python float. It is rebuilt when any of those tensors changes (identity
or in-place version) and dropped when the module is moved or cast.
"""

from __future__ import annotations

import contextvars
import functools
import logging
from collections import Counter
from contextlib import contextmanager

import torch

from . import has_triton

log = logging.getLogger(__name__)

MODES = ("auto", "triton", "torch")
_MODE: contextvars.ContextVar[str] = contextvars.ContextVar("effml_kernel_mode", default="auto")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# forwards per path ("w4a4", "w4a16", "torch"): lets tests and benchmarks see what actually ran
calls: Counter = Counter()


@contextmanager
def use_kernels(mode: str = "triton"):
    """Run QuantLinear forwards inside the block with ``mode`` ("auto", "triton" or "torch")."""
    if mode not in MODES:
        raise ValueError(f"kernel mode must be one of {MODES}, got {mode!r}")
    token = _MODE.set(mode)
    try:
        yield
    finally:
        _MODE.reset(token)


@functools.lru_cache(maxsize=1)
def _has_triton() -> bool:
    return has_triton()


def kernel_mode() -> str:
    return _MODE.get()


def plan(module) -> tuple[str | None, str]:
    """``(path, reason)``: the kernel path this QuantLinear supports, or ``None`` and why not."""
    from effml.quant.transforms import KroneckerTransform

    if module.weight is not None or module.w_bits > 4:
        return None, f"weights are {module.w_bits}-bit (kernels take 2..4-bit packed weights)"
    if module.in_features % 2:
        return None, f"in_features={module.in_features} is odd (two codes per byte need even rows)"
    aq = module.act_quant
    if aq is None or aq.bits >= 16:
        if module.group_size is not None and module.group_size % 2:
            return None, f"group_size={module.group_size} is odd"
        return "w4a16", "weight-only"
    if aq.bits > 4 or not aq.sym:
        return None, f"activations are {aq.bits}-bit {'sym' if aq.sym else 'asym'} (kernels: 2..4-bit sym)"
    if not module.w_sym or module.group_size is not None:
        return None, "W4A4 kernels need symmetric per-channel weights"
    t = module.input_transform
    if isinstance(t, KroneckerTransform):
        n2 = t.right.shape[0] if t.right is not None else module.in_features // t.left.shape[0]
        if n2 % 2:
            return None, f"transform factor n2={n2} is odd (packed pairs must not straddle its rows)"
    return "w4a4", "w4a4"


def _state_key(module, x: torch.Tensor) -> tuple:
    """Identity and in-place version of every tensor the cache copies."""
    parts = [x.device, x.dtype]
    t = module.input_transform
    aq = module.act_quant
    tensors = [module._buffers.get("qweight"), module._buffers.get("scales"), module._buffers.get("zeros"),
               module.bias, getattr(t, "left", None), getattr(t, "right", None), getattr(t, "scale", None),
               getattr(aq, "clip_logit", None)]
    for v in tensors:
        parts.append(None if v is None else (id(v), v._version))
    parts += [id(t), id(aq), None if aq is None else (aq.bits, aq.clip)]
    return tuple(parts)


def _build_cache(module, x: torch.Tensor, path: str) -> dict:
    from effml.quant.transforms import KroneckerTransform

    n, k = module.out_features, module.in_features
    c: dict = {"path": path, "w": module.qweight.view(n, k // 2)}
    c["bias"] = None if module.bias is None else module.bias.detach().float().contiguous()
    t = module.input_transform
    f32 = lambda v: None if v is None else v.detach().float().contiguous()  # noqa: E731
    if path == "w4a4":
        c["w_scale"] = module.scales.detach().float().reshape(n).contiguous()
        if isinstance(t, KroneckerTransform):
            c["left"], c["right"], c["smul"], c["torch_transform"] = f32(t.left), f32(t.right), f32(t.scale), None
        else:  # any other online transform runs in torch before the fused quantizer
            c["left"] = c["right"] = c["smul"] = None
            c["torch_transform"] = t
        clip = module.act_quant.clip_ratio()
        c["clip"] = float(clip.detach().reshape(-1)[0]) if isinstance(clip, torch.Tensor) else float(clip)
        c["a_bits"] = module.act_quant.bits
    else:
        c["scales"] = module.scales.detach().contiguous()
        c["zeros"] = None if module.w_sym else module.zeros.detach().contiguous()
        c["torch_transform"] = t
    return c


def _cache(module, x: torch.Tensor, path: str) -> dict:
    key = _state_key(module, x)
    c = module.__dict__.get("_kernel_cache")
    if c is None or c["key"] != key:
        c = _build_cache(module, x, path)
        c["key"] = key
        module.__dict__["_kernel_cache"] = c
    return c


def _skip(module, mode: str, reason: str) -> None:
    """Log once per module why it stays on the torch path (at INFO when kernels were forced)."""
    if module.__dict__.get("_kernel_skip_logged") != reason:
        module.__dict__["_kernel_skip_logged"] = reason
        log.log(logging.INFO if mode == "triton" else logging.DEBUG, "QuantLinear(%d->%d) on torch: %s",
                module.in_features, module.out_features, reason)


def linear_forward(module, x: torch.Tensor) -> torch.Tensor | None:
    """QuantLinear's output computed by the kernels, or ``None`` when the torch path should run."""
    mode = _MODE.get()
    if mode == "torch" or (mode == "auto" and not (x.is_cuda and _has_triton())):
        calls["torch"] += 1
        return None
    if x.dtype not in FLOAT_DTYPES or x.shape[-1] != module.in_features:
        _skip(module, mode, f"input {x.dtype} {tuple(x.shape)}")
        calls["torch"] += 1
        return None
    aq = module.act_quant
    if torch.is_grad_enabled() and (x.requires_grad or (aq is not None and aq.ste)):
        calls["torch"] += 1  # kernels have no backward
        return None
    path, reason = plan(module)
    if path is None:
        _skip(module, mode, reason)
        calls["torch"] += 1
        return None
    c = _cache(module, x, path)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, module.in_features)
    if c["torch_transform"] is not None:
        x2 = c["torch_transform"](x2)
    if path == "w4a4":
        from .act_quant import transform_quant
        from .int4_gemm import int4_gemm

        packed, a_scale = transform_quant(x2, c["left"], c["right"], c["clip"], c["a_bits"], c["smul"])
        y = int4_gemm(packed, a_scale, c["w"], c["w_scale"], c["bias"], out_dtype=x.dtype, a_bits=c["a_bits"],
                      w_bits=module.w_bits)
    else:
        from .w4a16_gemm import w4a16_gemm

        y = w4a16_gemm(x2.contiguous(), c["w"], c["scales"], c["zeros"], module.group_size, c["bias"],
                       bits=module.w_bits)
    calls[path] += 1
    return y.reshape(*lead, module.out_features)
