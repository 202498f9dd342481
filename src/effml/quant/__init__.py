"""Quantization methods (FlatQuant and its baselines). Methods register themselves on import."""

from . import baselines, cli, flatquant, quarot, smoothquant  # noqa: F401  (register the methods and the CLI)
from .api import methods, quantize, register_method
from .config import QuantConfig
from .flatquant import finish_weights
from .qlinear import QuantLinear

__all__ = ["QuantConfig", "QuantLinear", "finish_weights", "methods", "quantize", "register_method"]
