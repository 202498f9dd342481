"""What every ``effml`` subcommand shares: the command registry, the model and evaluation
arguments, loading a model from them, and result rows.

Method CLIs (``effml.quant.cli``, ...) and the demo import from here, never from
:mod:`effml.cli`, which imports them to collect their commands: no import circle.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

# name -> (help, add_arguments(parser), run(args) -> exit code)
COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {}


def register_command(name: str, help: str, add_arguments, run) -> None:
    COMMANDS[name] = (help, add_arguments, run)


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m",
                   help="alias, .gguf file, folder written by effml.save or save_pretrained, or hub id")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="weights dtype of HF / GGUF models (default float32); effml folders load as saved")


def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="wikitext2",
                   help="evaluation text: wikitext2, c4, a text file, or the text itself")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--max-windows", type=int, default=None, help="evaluate only the first N windows")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")


def load_from_args(args):
    import torch

    from .core import load_model

    dtype = getattr(torch, args.dtype) if args.dtype else None
    return load_model(args.model, dtype=dtype, device=args.device)


def evaluate_row(name: str, model, tokenizer, args) -> dict:
    """One table row: size and perplexity of ``model``."""
    from .core import model_size, perplexity

    start = time.perf_counter()
    ppl = perplexity(model, tokenizer, text=args.data, seq_len=args.seq_len, max_windows=args.max_windows)
    size = model_size(model)
    return {
        "model": name,
        "parameters": size["parameters"],
        "MB": round(size["megabytes"], 1),
        "bits/weight": round(size["bits_per_weight"], 2),
        f"ppl({data_label(args.data)})": round(ppl, 3),
        "eval_s": round(time.perf_counter() - start, 1),
    }


def data_label(data: str) -> str:
    """A table header for the evaluation text: its name or path, or "text" for literal text."""
    from .core.data import text_source_kind

    return data if text_source_kind(data) != "literal" else "text"


def print_rows(rows: list[dict], args) -> None:
    from .core.table import format_table

    print(format_table(rows))
    if getattr(args, "json", None):
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
