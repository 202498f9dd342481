"""Write an ordinary HF folder: config.json, sharded safetensors + index, generation config, tokenizer."""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import torch

log = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
DEFAULT_SHARD_BYTES = 2 * 2**30


def check_dir(out_dir: str | Path, overwrite: bool) -> Path:
    """Refuse an output folder that already holds files (unless ``overwrite``); touches nothing."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder: choose another --out")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out} is not empty: choose an empty or new folder, or pass overwrite=True "
                                  "(CLI: --overwrite) to replace its checkpoint files")
    return out


def prepare_dir(out_dir: str | Path, overwrite: bool) -> Path:
    """The output folder, created, with an earlier export's shards removed when overwriting."""
    out = check_dir(out_dir, overwrite)
    if out.is_dir():
        # stale shards of an earlier export would be picked up by no index, but keep the folder clean
        for f in list(out.glob("model*.safetensors")) + [out / INDEX_FILE]:
            if f.is_file():
                f.unlink()
    out.mkdir(parents=True, exist_ok=True)
    return out


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def write_shards(tensors: dict[str, torch.Tensor], out: Path, max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> int:
    """``model-0000i-of-0000n.safetensors`` plus ``model.safetensors.index.json`` (always an index,
    even for one shard, so every export has the same layout). Returns the total bytes."""
    from safetensors.torch import save_file

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    seen: set[int] = set()
    for key in sorted(tensors):
        t = tensors[key]
        if t.numel() and t.untyped_storage().data_ptr() in seen:
            t = t.clone()  # safetensors stores no aliases: depths that shared a tensor each get a copy
        seen.add(t.untyped_storage().data_ptr())
        if shards[-1] and size + _nbytes(t) > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = t
        size += _nbytes(t)
    n = len(shards)
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        save_file(shard, str(out / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
    total = sum(_nbytes(t) for t in tensors.values())
    (out / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return total


def write_config(model, out: Path, dtype: torch.dtype, quantization_config: dict | None, **overrides) -> None:
    """config.json of the original family (effml's attention routing is not part of it) and
    generation_config.json."""
    config = copy.deepcopy(model.config)
    for attr in ("quantization_config", "effml_inner_attn_implementation"):
        if hasattr(config, attr):
            delattr(config, attr)
    config.dtype = dtype
    for k, v in overrides.items():
        setattr(config, k, v)
    if quantization_config is not None:
        config.quantization_config = quantization_config
    config.save_pretrained(out)
    gen = getattr(model, "generation_config", None)
    if gen is None:
        from transformers import GenerationConfig

        gen = GenerationConfig.from_model_config(config)
    gen.save_pretrained(out)


def write_tokenizer(tokenizer, out: Path) -> None:
    if tokenizer is None:
        log.warning("no tokenizer given: %s has no tokenizer files; pass tokenizer= so serving tools can load it", out)
        return
    tokenizer.save_pretrained(out)
