"""Relaxed Recursive Transformers: layer tying, per-depth SVD-initialised LoRA (ranks by hand or by a parameter
budget), distillation uptraining, block-local healing, and the layer-dropping baseline."""

from .activations import input_grams
from .budget import greedy_ranks, whitened_energies
from .config import INITS, STRATEGIES, RecursiveConfig
from .convert import recursify, retie, tied_parameter_names
from .drop import block_influence, drop_layers
from .engine import Engine, Request
from .heal import heal
from .lora import DepthLoRALinear, truncate_ranks
from .report import parameter_report
from .sharing import init_sources, share_groups, stepwise_layers
from .uptrain import UptrainConfig, uptrain

__all__ = [
    "Engine", "Request", "INITS", "STRATEGIES", "DepthLoRALinear", "RecursiveConfig", "UptrainConfig", "uptrain", "init_sources", "input_grams", "parameter_report", "recursify",
    "retie", "share_groups", "stepwise_layers", "tied_parameter_names", "truncate_ranks",
    "block_influence", "drop_layers", "greedy_ranks", "heal", "whitened_energies",
]

from . import cli  # noqa: E402,F401  (registers `effml recursify` and `effml uptrain`)
