"""The ``effml`` command line. Subcommands register themselves with :func:`register_command`."""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
import time
from collections.abc import Callable

_COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {}


def register_command(name: str, help: str, add_arguments, run) -> None:
    _COMMANDS[name] = (help, add_arguments, run)


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m", help="alias, .gguf file, HF folder or hub id")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])


def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="wikitext2", help="evaluation text: wikitext2, c4 or a text file")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--max-windows", type=int, default=None, help="evaluate only the first N windows")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")


def load_from_args(args):
    import torch

    from .core import load_model

    return load_model(args.model, dtype=getattr(torch, args.dtype), device=args.device)


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
        f"ppl({args.data})": round(ppl, 3),
        "eval_s": round(time.perf_counter() - start, 1),
    }


def print_rows(rows: list[dict], args) -> None:
    from .core.table import format_table

    print(format_table(rows))
    if getattr(args, "json", None):
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


def _add_eval(p):
    add_model_arguments(p)
    add_eval_arguments(p)


def _run_eval(args) -> int:
    model, tokenizer = load_from_args(args)
    print_rows([evaluate_row(args.model, model, tokenizer, args)], args)
    return 0


register_command("eval", "perplexity and size of a model", _add_eval, _run_eval)


def _register_demo():
    from . import demo

    register_command("demo", "the main job: compress the default model with each method and compare", demo.add_arguments, demo.run)


_register_demo()


def main(argv: list[str] | None = None) -> int:
    for pkg in ("effml.quant", "effml.prune", "effml.recursive"):
        importlib.import_module(pkg)  # methods add their subcommands on import
    parser = argparse.ArgumentParser(prog="effml", description="compress HuggingFace causal LMs")
    parser.add_argument("-v", "--verbose", action="store_true", help="log per-layer progress")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, add_arguments, _) in sorted(_COMMANDS.items()):
        add_arguments(sub.add_parser(name, help=help_text))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return _COMMANDS[args.command][2](args)
    except (ValueError, FileNotFoundError, ModuleNotFoundError, RuntimeError) as e:
        print(f"effml: error: {e}", file=sys.stderr)
        return 2
