"""effml: one library to quantize, prune and recursify HuggingFace causal LMs."""

import logging

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

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = [
    "calibration_data", "fidelity", "get_arch", "load", "load_model", "model_size", "perplexity",
    "register_arch", "save", "supported_architectures", "quantize", "recursify",
]
from . import prune  # noqa: E402

esd = prune.esd
plot_esd = prune.plot_esd
from .quant import quantize  # noqa: E402
from .recursive import recursify  # noqa: E402
