"""When a QuantLinear runs on a kernel (Triton on GPU, PyTorch's integer kernels on CPU), and
what it hands them.

Modes (``use_kernels(mode)``, a context manager; the default is ``"auto"``):

* ``"auto"``: Triton kernels for inputs on a CUDA device when Triton is installed, the CPU
  kernels (below) for CPU inputs, torch elsewhere;
* ``"triton"``: Triton kernels wherever the layer is supported (CPU tensors need
  ``TRITON_INTERPRET=1`` set before the kernels are first used: this is how the tests run them);
* ``"cpu"``: the CPU kernels (CPU inputs only);
* ``"torch"``: always QuantLinear's reference torch path.

Triton paths: ``"w4a4"`` (weights <= 4-bit, symmetric per channel, activations <= 4-bit symmetric
per token): fused transform + quantize, then the int4 GEMM. ``"w4a16"`` (weights <= 4-bit in any
QuantLinear layout, no activation quantizer): the online transform in torch, then the weight-only
GEMM. Anything else (asymmetric activations, 5..8-bit weights, grouped W4A4, odd sizes, float
weights) stays on the torch path. Kernels are inference-only: while autograd records (the input
needs a gradient, or a quantizer is in straight-through calibration mode) the torch path runs.

CPU paths (kernels/cpu_int4.py, kernels/cpu_int8.py): ``"cpu_int4"`` (weight-only 2..4-bit,
groups 32..256 or per channel: the int4-pack kernel), ``"cpu_int8w"`` (weight-only per-channel
5..8-bit, or 2..4-bit the int4 kernel cannot take: the int8-pack kernel), ``"cpu_intmm"``
(symmetric per-token activations, per-channel weights: ``torch._int_mm``, bit-exact integer
accumulators). The two weight-only kernels are fast only with bfloat16 activations (their
float32 versions are scalar loops, 10-50x slower than a dense float32 GEMM), so by default they
compute in bfloat16 (``cpu_weight_only_dtype``); float32 is exact and slow. Above
``PREFILL_ROWS`` rows a dense float GEMM beats the int4 kernel, so prefill dequantizes each
int4 weight transiently (counted as ``"cpu_dequant"``; the int8 kernel stays within ~1.7x of it
and avoids dequantizing large LM heads). Anything else runs the torch path with one logged line per
module saying why.

The Triton kernels read QuantLinear's own packed buffer (``qweight`` viewed as [out, in/2]), and
so do the CPU int8 paths for 8-bit symmetric weights (``qweight`` viewed as int8 [out, in]); the
per-module cache (``module._kernel_cache``, never saved) holds float32 copies of the small tensors
(scales, bias, transform factors), the clip ratio, and for the other CPU paths the kernel's
packed weight, built once. It is rebuilt when any of those tensors changes (identity or in-place
version) and dropped when the module is moved or cast.
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

MODES = ("auto", "triton", "cpu", "torch")
_MODE: contextvars.ContextVar[str] = contextvars.ContextVar("effml_kernel_mode", default="auto")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# forwards per path ("w4a4", "w4a16", "cpu_int4", "cpu_int8w", "cpu_intmm", "cpu_dequant", "torch"):
# lets tests and benchmarks see what actually ran
calls: Counter = Counter()

# CPU weight-only kernels: activation dtype (bfloat16 = fast, float32 = exact but slow), and the
# row count above which a transient dense weight and one float GEMM are faster (prefill)
_CPU_WO_DTYPE: contextvars.ContextVar[torch.dtype] = contextvars.ContextVar("effml_cpu_wo_dtype",
                                                                            default=torch.bfloat16)
PREFILL_ROWS = 128  # measured here: at 256 rows the int4 kernel is ~1.4x slower than fp32 F.linear
_DENSE_CACHE = [False]


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


@contextmanager
def cpu_weight_only_dtype(dtype: torch.dtype):
    """Compute dtype of the CPU weight-only kernels inside the block: ``torch.bfloat16`` (the
    default: fast, outputs within bfloat16 rounding of the reference) or ``torch.float32``
    (the reference weights exactly, but the kernels' float32 loops are slow)."""
    if dtype not in (torch.bfloat16, torch.float32):
        raise ValueError(f"CPU weight-only kernels compute in torch.bfloat16 or torch.float32, got {dtype}")
    token = _CPU_WO_DTYPE.set(dtype)
    try:
        yield
    finally:
        _CPU_WO_DTYPE.reset(token)


def keep_dense_cache(flag: bool | None = None) -> bool:
    """Whether QuantLinear keeps its dequantized float weight after computing it (default
    ``False``: resident memory stays packed). ``flag`` sets it for the process; a module's
    ``keep_dense`` attribute, when not ``None``, overrides it. Returns the setting."""
    if flag is not None:
        _DENSE_CACHE[0] = bool(flag)
    return _DENSE_CACHE[0]


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
    parts = [x.device, x.dtype, _CPU_WO_DTYPE.get()]
    t = module.input_transform
    aq = module.act_quant
    tensors = [module._buffers.get("qweight"), module._buffers.get("scales"), module._buffers.get("zeros"),
               module.bias, getattr(t, "left", None), getattr(t, "right", None), getattr(t, "scale", None),
               getattr(aq, "clip_logit", None)]
    for v in tensors:
        parts.append(None if v is None else (id(v), v._version))
    parts += [id(t), id(aq), None if aq is None else (aq.bits, aq.clip)]
    return tuple(parts)


def plan_cpu(module) -> tuple[str | None, str]:
    """``(path, reason)``: the CPU kernel path for this QuantLinear, or ``None`` and why not."""
    from . import cpu_int4, cpu_int8

    if module.weight is not None:
        return None, "float weights"
    n, k, bits, g = module.out_features, module.in_features, module.w_bits, module.group_size
    aq = module.act_quant
    if aq is None or aq.bits >= 16:
        if bits <= 4:
            group, why = cpu_int4.kernel_group(k, n, g)
            if group is not None:
                return "cpu_int4", why
            if g is not None:
                return None, why
        return _int8_codes_path(
            module, f"group_size={g} with {bits}-bit weights (the int8 weight-only kernel is per channel)",
            cpu_int8.available_int8pack, "this torch build has no _weight_int8pack_mm", ("cpu_int8w", "weight-only int8"))
    if not aq.sym:
        return None, f"asymmetric {aq.bits}-bit activations (the int_mm path takes symmetric ones)"
    return _int8_codes_path(
        module, f"group_size={g} with quantized activations (the int_mm epilogue takes per-channel scales)",
        cpu_int8.available_int_mm, "this torch build has no torch._int_mm", ("cpu_intmm", "int8 x int8"))


def _int8_codes_path(module, grouped_why: str, available, missing_why: str, path: tuple[str, str]):
    """The int8-code kernels (weight-only int8-pack, int_mm): per channel, codes that fit int8,
    and the op present in this torch build."""
    from . import cpu_int8

    if module.group_size is not None:
        return None, grouped_why
    ok, fit = cpu_int8.weight_codes_fit(module.w_bits, module.w_sym)
    if not ok:
        return None, fit
    if not available():
        return None, missing_why
    return path


def _codes_and_zero_points(module) -> tuple[torch.Tensor, torch.Tensor]:
    from effml.quant.quantizers import unpack_codes

    n, k = module.out_features, module.in_features
    codes = unpack_codes(module.qweight, module.w_bits, (n, k))
    if module.w_sym:
        zp = torch.full_like(module.scales, 2 ** (module.w_bits - 1), dtype=torch.float32)
    else:
        zp = module.zeros.float()
    return codes, zp


def _build_cpu_cache(module, path: str) -> dict:
    from . import cpu_int4, cpu_int8

    c: dict = {"path": path, "torch_transform": module.input_transform}
    c["bias"] = None if module.bias is None else module.bias.detach().float().contiguous()
    if path == "cpu_int4":
        codes, zp = _codes_and_zero_points(module)
        group, _ = cpu_int4.kernel_group(module.in_features, module.out_features, module.group_size)
        dt = _CPU_WO_DTYPE.get()
        c.update(packed=cpu_int4.pack(codes), group=group, dtype=dt,
                 sz=cpu_int4.scales_and_zeros(module.scales, zp, module.in_features, group, dt))
        return c
    # int8 codes c - zp, per channel: 8-bit symmetric ones are qweight itself (a view that
    # aliases the buffer, so no second [N, K] copy), others are built once
    if cpu_int8.codes_in_place(module.w_bits, module.w_sym):
        w8 = cpu_int8.stored_signed_codes(module.qweight, module.out_features, module.in_features)
    else:
        codes, zp = _codes_and_zero_points(module)
        w8 = cpu_int8.signed_codes(codes, zp.reshape(-1))
    if path == "cpu_int8w":
        dt = _CPU_WO_DTYPE.get()
        c.update(w8=w8, dtype=dt, w_scale=module.scales.detach().float().reshape(-1).to(dt).contiguous())
    else:
        c.update(w8=w8, w_scale=module.scales.detach().float().reshape(-1).contiguous())
    return c


def _build_cache(module, x: torch.Tensor, path: str) -> dict:
    if path.startswith("cpu_"):
        return _build_cpu_cache(module, path)
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
    if c is None or c["key"] != key or c["path"] != path:
        c = _build_cache(module, x, path)
        c["key"] = _state_key(module, x)  # after building: it may realign qweight in place
        module.__dict__["_kernel_cache"] = c
    return c


def _skip(module, mode: str, reason: str, level: int | None = None) -> None:
    """Log once per module why it stays on the torch path (at INFO when kernels were forced)."""
    if module.__dict__.get("_kernel_skip_logged") != reason:
        module.__dict__["_kernel_skip_logged"] = reason
        if level is None:
            level = logging.INFO if mode in ("triton", "cpu") else logging.DEBUG
        log.log(level, "QuantLinear(%d->%d) on torch: %s", module.in_features, module.out_features, reason)


def _cpu_forward(module, x: torch.Tensor, mode: str) -> torch.Tensor | None:
    """The CPU kernels' output, or ``None`` (torch path, with the reason logged once)."""
    from . import cpu_int4, cpu_int8

    path, reason = plan_cpu(module)
    if path is None:
        # a quantized layer that misses the kernels is worth one INFO line; a float one is not
        _skip(module, mode, reason, logging.INFO if module.weight is None else logging.DEBUG)
        return None
    c = _cache(module, x, path)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, module.in_features)
    if c["torch_transform"] is not None:
        x2 = c["torch_transform"](x2)
    try:
        if path == "cpu_intmm":
            aq = module.act_quant
            y = cpu_int8.quantized_matmul(x2, aq.bits, aq.clip_ratio(), c["w8"].t(), c["w_scale"], c["bias"])
        elif path == "cpu_int4" and x2.shape[0] > PREFILL_ROWS:
            # prefill: a transient dense weight (dropped after the call) and one float GEMM
            w = module.dequantized_weight().to(x2.dtype)
            bias = None if c["bias"] is None else c["bias"].to(x2.dtype)
            y = torch.nn.functional.linear(x2, w, bias)
            path = "cpu_dequant"
        else:
            xc = x2.to(c["dtype"])
            if path == "cpu_int4":
                y = cpu_int4.matmul(xc, c["packed"], c["group"], c["sz"])
            else:
                y = cpu_int8.int8_weight_matmul(xc, c["w8"], c["w_scale"])
            y = y.to(x.dtype)
            if c["bias"] is not None:
                y = y + c["bias"].to(x.dtype)
    except RuntimeError as e:  # e.g. a CPU without the instructions the kernel was built for
        module.__dict__.pop("_kernel_cache", None)
        module.__dict__["_kernel_cpu_failed"] = True
        _skip(module, mode, f"{path} failed ({str(e).splitlines()[0][:200]})", logging.INFO)
        return None
    calls[path] += 1
    return y.reshape(*lead, module.out_features)


def prepare(model) -> int:
    """Build the CPU kernels' packed weights of every quantized QuantLinear on CPU now (instead
    of at its first forward), for float32 inputs; returns how many were packed."""
    from effml.quant.qlinear import QuantLinear

    n = 0
    for m in model.modules():
        if isinstance(m, QuantLinear) and m.weight is None and m.qweight.device.type == "cpu":
            path, _ = plan_cpu(m)
            if path is not None:
                _cache(m, torch.empty(0, m.in_features), path)
                n += 1
    return n


def linear_forward(module, x: torch.Tensor) -> torch.Tensor | None:
    """QuantLinear's output computed by the kernels, or ``None`` when the torch path should run."""
    mode = _MODE.get()
    on_cpu = x.device.type == "cpu" and (mode == "cpu" or (mode == "auto" and module.weight is None))
    if mode == "torch" or (mode == "auto" and not on_cpu and not (x.is_cuda and _has_triton())):
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
    if on_cpu or mode == "cpu":
        y = None if (mode == "cpu" and not on_cpu) or module.__dict__.get("_kernel_cpu_failed") else \
            _cpu_forward(module, x, mode)
        if y is None:
            calls["torch"] += 1
        return y
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


def resident_bytes(module) -> int:
    """Bytes a module holds in memory: its parameters and buffers (each storage once), the
    kernels' cache and any dense float copy of a QuantLinear below it."""
    seen: set = set()
    total = 0

    def add(t):
        nonlocal total
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            key = (t.untyped_storage().data_ptr(), t.device)
            if key not in seen:
                seen.add(key)
                total += t.untyped_storage().nbytes()

    for t in list(module.parameters()) + list(module.buffers()):
        add(t)
    for m in module.modules():
        add(m.__dict__.get("_deq"))
        for v in (m.__dict__.get("_kernel_cache") or {}).values():
            add(v)
    return total
