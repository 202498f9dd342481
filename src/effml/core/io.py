"""Saving and loading compressed models: safetensors plus a versioned JSON file. Never pickle.

A method that changes a model's structure makes that change reproducible in one of two ways:

* a module class registered with :func:`register_module_type` provides ``effml_spec()`` (JSON)
  and ``effml_build(spec)`` (an empty module of the right shapes); every such module is
  recorded by path and rebuilt on load;
* a whole-model transform registered with :func:`register_model_transform` is recorded with
  :func:`record_transform` and replayed, in order, on the freshly built model.

Tensors shared between modules (tied embeddings, recursive blocks) are stored once; the layout
says which keys alias which, and loading restores the sharing.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .size import tensor_key
from .surgery import set_submodule

log = logging.getLogger(__name__)

# 2: effml.json records the sha256 and size of every weight file ("weights"); 1 is still read
# 3: 8-bit QuantLinear codes are stored as code ^ 0x80 (quant.quantizers.pack_codes); 1 and 2
#    are converted on load (_upgrade_codes)
FORMAT_VERSION = 3
META_FILE = "effml.json"
WEIGHTS_FILE = "model.safetensors"

_MODULE_TYPES: dict[str, type] = {}
_MODEL_TRANSFORMS: dict[str, Callable[..., nn.Module]] = {}


def register_module_type(cls: type) -> type:
    """Class decorator: instances are saved by path with ``effml_spec()`` and rebuilt with
    ``cls.effml_build(spec)``."""
    for attr in ("effml_spec", "effml_build"):
        if not hasattr(cls, attr):
            raise TypeError(f"{cls.__name__} must define {attr} to be saved by effml")
    _MODULE_TYPES[cls.__name__] = cls
    return cls


def register_model_transform(name: str):
    """Decorator for ``fn(model, **spec) -> model`` that rebuilds a structural change on load."""

    def deco(fn):
        _MODEL_TRANSFORMS[name] = fn
        return fn

    return deco


def record_transform(model: nn.Module, name: str, **spec: Any) -> None:
    if name not in _MODEL_TRANSFORMS:
        raise KeyError(f"model transform {name!r} is not registered")
    json.dumps(spec)  # fail now, not at save time, if the spec is not JSON
    transforms = model.__dict__.setdefault("effml_transforms", [])
    transforms.append({"type": name, "spec": spec})


def _unique_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """State dict with each storage once, plus alias -> canonical key."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    canonical: dict[tuple, str] = {}
    for key, t in model.state_dict(keep_vars=False).items():
        ident = tensor_key(t)
        if ident in canonical:
            aliases[key] = canonical[ident]
            continue
        canonical[ident] = key
        tensors[key] = t.detach().contiguous().cpu()
    # distinct keys that still overlap in memory (views of one buffer) must not share storage
    seen_ptrs: dict[int, str] = {}
    for key, t in tensors.items():
        ptr = t.untyped_storage().data_ptr()
        if t.numel() > 0 and ptr in seen_ptrs:
            tensors[key] = t.clone()
        seen_ptrs[ptr] = key
    return tensors, aliases


def save(model: nn.Module, directory: str | Path, tokenizer=None) -> Path:
    """Write ``config.json``, ``model.safetensors`` and ``effml.json`` (plus the tokenizer).

    ``effml.json`` is written last and records the sha256 of every weight file, so a folder
    whose save was interrupted, or whose weights changed since, is refused by :func:`load`.
    """
    from safetensors.torch import save_file

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    modules = {
        name: {"type": type(m).__name__, "spec": m.effml_spec()}
        for name, m in model.named_modules()
        if type(m).__name__ in _MODULE_TYPES and type(m) is _MODULE_TYPES[type(m).__name__]
    }
    tensors, aliases = _unique_state(model)
    model.config.save_pretrained(out)
    save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": "pt", "effml_format_version": str(FORMAT_VERSION)})
    meta = {
        "format_version": FORMAT_VERSION,
        "model_type": model.config.model_type,
        # kernels differ in rounding: reload with the same one so outputs match bit for bit
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
        "transforms": model.__dict__.get("effml_transforms", []),
        "modules": modules,
        "aliases": aliases,
        "weights": {WEIGHTS_FILE: file_digest(out / WEIGHTS_FILE)},
        "report": _jsonable(getattr(model, "effml_report", None)),
    }
    (out / META_FILE).write_text(json.dumps(meta, indent=2))
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    size = sum(entry["bytes"] for entry in meta["weights"].values())
    log.info("saved to %s (%.1f MB of weights)", out, size / 2**20)
    return out


class CheckpointError(ValueError):
    """An effml folder that cannot be trusted: missing, truncated or altered files."""


def file_digest(path: str | Path) -> dict:
    """``{"sha256": hex digest, "bytes": size}`` of one file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return {"sha256": h.hexdigest(), "bytes": Path(path).stat().st_size}


def verify_file(path: Path, expected: dict) -> None:
    """Raise :class:`CheckpointError` naming ``path`` unless its size and sha256 are ``expected``."""
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: {META_FILE} lists it as a weight file of this model")
    size = path.stat().st_size
    if size != expected["bytes"]:
        raise CheckpointError(
            f"{path} has {size} bytes but was saved with {expected['bytes']}: the file is truncated or was "
            "replaced; save the model again (or pass verify=False to load it anyway)"
        )
    digest = file_digest(path)["sha256"]
    if digest != expected["sha256"]:
        raise CheckpointError(
            f"{path} does not match the sha256 recorded at save time (expected {expected['sha256'][:16]}..., "
            f"got {digest[:16]}...): the file is corrupt or was modified; save the model again "
            "(or pass verify=False to load it anyway)"
        )


# what load needs from effml.json, with the JSON type of each entry ("weights" from format 2 on)
_REQUIRED = {"format_version": int, "transforms": list, "modules": dict, "aliases": dict}
_REQUIRED_V2 = {"weights": dict}


def read_meta(src: Path) -> dict:
    """The parsed, checked ``effml.json`` of ``src`` (format 1 or later)."""
    meta_path = src / META_FILE
    if not meta_path.is_file():
        raise FileNotFoundError(f"{src} has no {META_FILE}: it was not written by effml.save")
    try:
        meta = json.loads(meta_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{meta_path} is not valid JSON ({e}): the save was interrupted or the file was edited") from e
    if not isinstance(meta, dict):
        raise CheckpointError(f"{meta_path} must hold a JSON object, got {type(meta).__name__}")
    version = meta.get("format_version")
    if isinstance(version, int) and version > FORMAT_VERSION:
        raise ValueError(
            f"{src} uses effml format version {version}, this effml reads up to {FORMAT_VERSION}: upgrade effml"
        )
    required = dict(_REQUIRED, **(_REQUIRED_V2 if isinstance(version, int) and version >= 2 else {}))
    bad = [k for k, kind in required.items() if not isinstance(meta.get(k), kind) or isinstance(meta.get(k), bool)]
    if not bad and version < 1:
        bad = ["format_version"]
    if bad:
        raise CheckpointError(f"{meta_path} is incomplete or damaged: {', '.join(bad)} missing or of the wrong type")
    for name, entry in meta.get("weights", {}).items():
        if not (isinstance(entry, dict) and isinstance(entry.get("sha256"), str) and isinstance(entry.get("bytes"), int)):
            raise CheckpointError(f"{meta_path}: the record of weight file {name!r} is damaged (needs sha256 and bytes)")
    return meta


def _load_weights(src: Path, meta: dict, verify: bool) -> dict[str, torch.Tensor]:
    """Every tensor of the weight files, each file checked against its recorded sha256 first."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    files = meta.get("weights")
    if files is None:  # format 1: one file, no digests recorded
        log.info("%s is effml format %d: no checksums recorded, weights not verified", src, meta["format_version"])
        files = {WEIGHTS_FILE: None}
    state: dict[str, torch.Tensor] = {}
    for name, expected in files.items():
        path = src / name
        if verify and expected is not None:
            verify_file(path, expected)
        elif not path.is_file():
            raise CheckpointError(f"{path} is missing: it holds this model's weights")
        try:
            state.update(load_file(str(path)))
        except SafetensorError as e:
            raise CheckpointError(f"{path} is not a readable safetensors file ({e}): save the model again") from e
    return state


def _upgrade_codes(state: dict[str, torch.Tensor], meta: dict) -> None:
    """Rewrite, in ``state``, the 8-bit QuantLinear codes of a format 1/2 folder (stored as the
    codes themselves) into format 3's bytes (``code ^ 0x80``). Runs on the verified tensors,
    before aliases are expanded, so a shared buffer is converted once."""
    if meta["format_version"] >= 3:
        return
    keys = set()
    for name, entry in meta["modules"].items():
        spec = entry.get("spec")
        if entry.get("type") == "QuantLinear" and isinstance(spec, dict) and spec.get("w_bits") == 8:
            key = f"{name}.qweight" if name else "qweight"
            keys.add(meta["aliases"].get(key, key))
    for key in keys:
        if key in state and state[key].dtype == torch.uint8:
            state[key] = state[key] ^ 0x80


def _jsonable(obj):
    if obj is None:
        return None
    try:
        return json.loads(json.dumps(obj, default=lambda o: o.item() if hasattr(o, "item") else str(o)))
    except (TypeError, ValueError):
        return None


def load(directory: str | Path, device: str | torch.device = "cpu", with_tokenizer: bool = False, verify: bool = True):
    """Rebuild a model written by :func:`save`; returns the model (and tokenizer if asked).

    Every weight file is checked against the sha256 recorded at save time before anything is
    built (``verify=False`` skips that; folders of format 1 carry no digests). A damaged folder
    raises :class:`CheckpointError` naming the file.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    src = Path(directory)
    meta = read_meta(src)
    state = _load_weights(src, meta, verify)
    _upgrade_codes(state, meta)  # after verification: the digests are of the stored bytes
    _import_methods()
    config = AutoConfig.from_pretrained(src)
    extra = {"attn_implementation": meta["attn_implementation"]} if meta.get("attn_implementation") else {}
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(config, "dtype", None) or torch.float32, **extra)
    for t in meta["transforms"]:
        if t["type"] not in _MODEL_TRANSFORMS:
            raise ValueError(f"{src} needs the model transform {t['type']!r}, which this effml does not provide")
        model = _MODEL_TRANSFORMS[t["type"]](model, **t["spec"])
        model.__dict__.setdefault("effml_transforms", []).append(t)
    for name in sorted(meta["modules"], key=lambda n: n.count(".")):
        entry = meta["modules"][name]
        if entry["type"] not in _MODULE_TYPES:
            raise ValueError(f"{src} needs the module type {entry['type']!r}, which this effml does not provide")
        set_submodule(model, name, _MODULE_TYPES[entry["type"]].effml_build(entry["spec"]))
    for alias, key in meta["aliases"].items():
        if key not in state:
            raise CheckpointError(f"{src / META_FILE}: alias {alias!r} points to {key!r}, which no weight file holds")
        state[alias] = state[key]
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        raise CheckpointError(
            f"{src}: weights do not match the rebuilt model (missing {missing[:5]}, unexpected {unexpected[:5]})"
        )
    _reshare(model, meta["aliases"])
    if meta.get("report") is not None:
        model.effml_report = meta["report"]
    model.to(device).eval()
    if with_tokenizer:
        return model, AutoTokenizer.from_pretrained(src)
    return model


def _reshare(model: nn.Module, aliases: dict[str, str]) -> None:
    """Make each alias the very same Parameter / buffer object as its canonical key, so that
    sharing behaves as before saving (one gradient, one optimizer state)."""
    for alias, key in aliases.items():
        mod_path, _, attr = key.rpartition(".")
        alias_path, _, alias_attr = alias.rpartition(".")
        owner = model.get_submodule(mod_path)
        target = model.get_submodule(alias_path)
        if attr in owner._parameters:
            target._parameters[alias_attr] = owner._parameters[attr]
        else:
            target._buffers[alias_attr] = owner._buffers[attr]


def _import_methods():
    """Method packages register their module types on import."""
    import importlib

    for pkg in ("effml.quant", "effml.prune", "effml.recursive"):
        importlib.import_module(pkg)
