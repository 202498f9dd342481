"""Export effml models as ordinary HF folders: compressed-tensors (transformers, vLLM) or unrolled.

Carried: weight-only W2..W8 (RTN / GPTQ), W8A8 (SmoothQuant, RTN / GPTQ), pruning (dense weights
with a ``sparsity_config``), and QuaRot / FlatQuant online transforms in front of either as a
dense ``transform_config`` (:mod:`effml.export.transforms`, with what transforms cannot carry).
Refused before any file is written: W4A4 / W4A8 and clipped / learned activation ranges, integer
KV caches unless ``kv_cache="drop"``, recursive models (``format="hf-unrolled"`` instead).
"""

from . import cli  # noqa: F401  (registers `effml export`)
from .api import FORMATS, REPORT_FILE, export
from .detect import is_compressed_tensors_dir, load_compressed_tensors
from .schemes import SUPPORTED, UnsupportedScheme

__all__ = ["FORMATS", "REPORT_FILE", "SUPPORTED", "UnsupportedScheme", "export", "is_compressed_tensors_dir",
           "load_compressed_tensors"]
