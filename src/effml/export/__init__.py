"""Export effml models as ordinary HF folders: compressed-tensors (transformers, vLLM) or unrolled."""

from . import cli  # noqa: F401  (registers `effml export`)
from .api import FORMATS, REPORT_FILE, export
from .detect import is_compressed_tensors_dir, load_compressed_tensors
from .schemes import SUPPORTED, UnsupportedScheme

__all__ = ["FORMATS", "REPORT_FILE", "SUPPORTED", "UnsupportedScheme", "export", "is_compressed_tensors_dir",
           "load_compressed_tensors"]
