"""``effml.quantize``: the method registry and the one entry point."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict

import torch
import torch.nn as nn

from .config import QuantConfig

log = logging.getLogger(__name__)

# name -> (config class, fn(model, cfg, calib) -> report dict)
_METHODS: dict[str, tuple[type[QuantConfig], Callable]] = {}


# name -> composition traits, each a bool or fn(cfg) -> bool; see preserves_sparsity & co.
_TRAITS: dict[str, dict[str, bool | Callable]] = {}


def register_method(name: str, config_cls: type[QuantConfig] = QuantConfig, *,
                    preserves_sparsity: bool | Callable = True, prunable_after: bool | Callable = True,
                    recursive: bool | Callable = True):
    """Register ``fn(model, cfg, calib) -> report`` as ``name``. The traits say how it composes
    (queried before any work by :func:`preserves_sparsity`, :func:`prunable_after`,
    :func:`supports_recursive`)."""

    def deco(fn):
        _METHODS[name] = (config_cls, fn)
        _TRAITS[name] = {"preserves_sparsity": preserves_sparsity, "prunable_after": prunable_after,
                         "recursive": recursive}
        return fn

    return deco


def _trait(method: str, cfg, key: str) -> bool:
    if method not in _METHODS:
        raise ValueError(f"unknown quantization method {method!r}; choose one of {methods()}")
    if cfg is None or isinstance(cfg, dict):
        cfg = method_config(method, **(cfg or {}))
    v = _TRAITS[method][key]
    return bool(v(cfg) if callable(v) else v)


def preserves_sparsity(method: str, cfg: QuantConfig | dict | None = None) -> bool:
    """Whether ``method`` (with ``cfg``: its config or options dict) stores a pruned model's
    exact zeros as exact zeros. RTN, GPTQ (mask-aware) and SmoothQuant (per-channel scales) do;
    QuaRot and FlatQuant store rotated / transformed weights, dense whatever the zeros (the
    model is still quantized, with a warning that the sparsity is lost)."""
    return _trait(method, cfg, "preserves_sparsity")


def prunable_after(method: str, cfg: QuantConfig | dict | None = None) -> bool:
    """Whether a model quantized by ``method`` can be pruned afterwards, exactly on its grid
    (pruned weights take the zero-point code, scales kept). False for methods with online input
    transforms (QuaRot, FlatQuant): prune first, then quantize."""
    return _trait(method, cfg, "prunable_after")


def supports_recursive(method: str, cfg: QuantConfig | dict | None = None) -> bool:
    """Whether ``method`` can quantize a recursive model (``effml.recursify``) keeping its blocks
    shared (quantized once). False for QuaRot and FlatQuant, whose transforms, merged into each
    depth's weights, would untie the shared weights."""
    return _trait(method, cfg, "recursive")


# below this fraction of exact zeros a model counts as dense (a few zeros occur by chance)
SPARSE_THRESHOLD = 0.01


def linear_sparsity(model: nn.Module) -> float:
    """Fraction of exact zeros in the decoder linears' (dequantized) weights, shared ones once."""
    from ..core.report import linear_stats

    return linear_stats(model)["sparsity"] or 0.0


def check_composition(model: nn.Module, method: str, cfg: QuantConfig) -> float:
    """Before any work: refuse what cannot compose, warn about what loses sparsity. Returns the
    model's current linear sparsity."""
    if getattr(model, "effml_recursive", None) is not None and not supports_recursive(method, cfg):
        raise ValueError(
            f"{method} cannot quantize a recursive model (effml.recursify): it merges its transforms into "
            "each depth's weights, which would untie the shared blocks. Use rtn, gptq or smoothquant on a "
            "recursive model"
        )
    sparsity = linear_sparsity(model)
    if sparsity > SPARSE_THRESHOLD and not preserves_sparsity(method, cfg):
        log.warning(
            "the model is %.1f%% sparse, but %s stores rotated / transformed weights, which are dense: the stored "
            "weights lose the sparsity (the pruned model's function is still what gets quantized). Use rtn, "
            "gptq or smoothquant to keep the zeros", 100 * sparsity, method,
        )
    return sparsity


def methods() -> list[str]:
    return sorted(_METHODS)


def method_config(method: str, **config) -> QuantConfig:
    if method not in _METHODS:
        raise ValueError(f"unknown quantization method {method!r}; choose one of {methods()}")
    return _METHODS[method][0].build(**config)


def linear_bits_per_weight(model: nn.Module) -> float | None:
    """Stored bits per weight of the decoder linears (packed codes + scales + zeros + bias);
    embeddings and lm_head stay in floating point and are not counted here."""
    from .qlinear import QuantLinear

    n = n_bytes = 0
    for m in model.modules():
        if isinstance(m, QuantLinear):
            w, b = m.effml_storage()
            n, n_bytes = n + w, n_bytes + b
    return round(8 * n_bytes / n, 3) if n else None


def quantize(
    model: nn.Module, method: str = "rtn", w_bits: int = 4, a_bits: int = 16, kv_bits: int = 16,
    calib: torch.Tensor | None = None, **config,
) -> nn.Module:
    """Quantize ``model`` in place and return it, with a report in ``model.effml_report``.

    ``method``: see :func:`methods` (rtn, gptq, smoothquant, quarot, flatquant as implemented).
    Bits: 2..8, or 16 to leave that part in floating point. ``calib``: ``[n, seq_len]`` token ids
    for methods that calibrate. Other options: the method's config dataclass fields.
    """
    cfg = method_config(method, w_bits=w_bits, a_bits=a_bits, kv_bits=kv_bits, **config)
    cfg.check_model(model)
    sparsity = check_composition(model, method, cfg)
    fn = _METHODS[method][1]
    start = time.perf_counter()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        report = fn(model, cfg, calib) or {}
        if sparsity > SPARSE_THRESHOLD:  # measured, so a lost sparsity shows in the report
            report["linear_sparsity"] = {"before": sparsity, "after": linear_sparsity(model)}
    report = {
        "method": method, "config": asdict(cfg), **report,
        "calibration_time_s": round(time.perf_counter() - start, 2),
        "linear_bits_per_weight": linear_bits_per_weight(model),
    }
    if cfg.lm_head_bits < 16:  # after the decoder linears are counted: the head is reported on its own
        from .lm_head import lm_head_step

        with torch.no_grad():
            report.update(lm_head_step(model, cfg))
    from ..kernels.dispatch import prepare

    prepare(model)  # CPU layers: pack for the CPU kernels now, not at the first forward
    if torch.cuda.is_available():
        report["peak_gpu_memory_mb"] = torch.cuda.max_memory_allocated() / 2**20
    from ..core.report import add_step  # appends to the history; earlier steps' reports stay

    add_step(model, "quantize", report, method=method, config=report["config"], seconds=report["calibration_time_s"])
    log.info("quantized with %s in %.1fs", method, report["calibration_time_s"])
    return model
