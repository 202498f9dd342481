"""The model-surgery core shared by every method: architectures, surgery, calibration, data,
evaluation and I/O."""

from . import families  # noqa: F401  (registers the built-in architectures)
from .arch import ArchSpec, Fused, NormSpec, get_arch, register_arch, supported_architectures
from .calibrate import BlockContext, LayerwiseEngine, logits_from_hidden, run_layerwise
from .data import DataUnavailableError, calibration_data, load_text
from .eval import fidelity, perplexity
from .io import load, record_transform, register_model_transform, register_module_type, save
from .loading import load_model
from .size import model_size
from .surgery import LinearRef, iter_linears, replace_linears, set_submodule, untie_embeddings

__all__ = [
    "ArchSpec", "BlockContext", "DataUnavailableError", "Fused", "LayerwiseEngine", "LinearRef", "NormSpec",
    "calibration_data", "fidelity", "get_arch", "iter_linears", "load", "load_model", "load_text",
    "logits_from_hidden", "model_size", "perplexity", "record_transform", "register_arch",
    "register_model_transform", "register_module_type", "replace_linears", "run_layerwise", "save",
    "set_submodule", "supported_architectures", "untie_embeddings",
]
