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


def register_method(name: str, config_cls: type[QuantConfig] = QuantConfig):
    def deco(fn):
        _METHODS[name] = (config_cls, fn)
        return fn

    return deco


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
    fn = _METHODS[method][1]
    start = time.perf_counter()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        report = fn(model, cfg, calib) or {}
    report = {
        "method": method, "config": asdict(cfg), **report,
        "calibration_time_s": round(time.perf_counter() - start, 2),
        "linear_bits_per_weight": linear_bits_per_weight(model),
    }
    if torch.cuda.is_available():
        report["peak_gpu_memory_mb"] = torch.cuda.max_memory_allocated() / 2**20
    model.effml_report = report
    log.info("quantized with %s in %.1fs", method, report["calibration_time_s"])
    return model
