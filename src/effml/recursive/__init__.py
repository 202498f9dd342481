"""Relaxed Recursive Transformers: layer tying, per-depth SVD-initialised LoRA, distillation uptraining."""

from .activations import input_grams
from .config import INITS, STRATEGIES, RecursiveConfig
from .convert import recursify, retie, tied_parameter_names
from .engine import Engine, Request
from .lora import DepthLoRALinear, truncate_ranks
from .report import parameter_report
from .sharing import init_sources, share_groups, stepwise_layers
from .uptrain import UptrainConfig, uptrain

__all__ = [
    "Engine", "Request", "INITS", "STRATEGIES", "DepthLoRALinear", "RecursiveConfig", "UptrainConfig", "uptrain", "init_sources", "input_grams", "parameter_report", "recursify",
    "retie", "share_groups", "stepwise_layers", "tied_parameter_names", "truncate_ranks",
]

from . import cli  # noqa: E402,F401  (registers `effml recursify` and `effml uptrain`)
