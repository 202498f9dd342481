"""effml: one library to quantize, prune and recursify HuggingFace causal LMs."""

import logging

from . import prune  # a callable module: effml.prune(model, sparsity, ...) prunes
from .compose import compress
from .core import (
    calibration_data,
    fidelity,
    get_arch,
    load,
    load_model,
    model_size,
    perplexity,
    register_arch,
    save,
    supported_architectures,
)
from .export import export
from .quant import quantize
from .recursive import recursify

esd = prune.esd
plot_esd = prune.plot_esd

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = [
    "calibration_data", "compress", "esd", "export", "fidelity", "get_arch", "load", "load_model", "model_size", "perplexity",
    "plot_esd", "prune", "quantize", "recursify", "register_arch", "save", "supported_architectures",
]
