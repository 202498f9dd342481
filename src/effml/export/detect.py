"""Recognise and load compressed-tensors folders (effml.load_model's branch for them)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch


def is_compressed_tensors_dir(path: str | Path) -> bool:
    """True for a folder whose config.json declares ``quant_method: compressed-tensors``."""
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    try:
        q = json.loads(cfg.read_text()).get("quantization_config") or {}
    except (OSError, ValueError):
        return False
    return isinstance(q, dict) and q.get("quant_method") == "compressed-tensors"


def load_compressed_tensors(path: str | Path, dtype: torch.dtype = torch.float32):
    """``(model, tokenizer)`` through transformers, which decompresses the weights (on load, or
    on the first forward pass) with the compressed-tensors package; online transforms
    (``transform_config``) applied by compressed-tensors with the stored matrices."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if importlib.util.find_spec("compressed_tensors") is None:
        raise ModuleNotFoundError(
            f"{path} is a compressed-tensors checkpoint; loading it needs the compressed-tensors package: "
            "pip install 'effml[export]' (or pip install compressed-tensors)")
    model, info = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, output_loading_info=True)
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        raise ValueError(f"{path}: the checkpoint lacks {len(missing)} weights ({', '.join(missing[:5])}); "
                         "it is incomplete")
    from .transforms import load_transforms

    # transformers (5.24) leaves a transform_config unapplied: its transform weights load nowhere
    load_transforms(model, path)
    return model.eval(), AutoTokenizer.from_pretrained(str(path))
