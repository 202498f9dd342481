"""The ``effml`` command line.

Subcommands register themselves in :mod:`effml.cli_common` when their module is imported;
this module imports the modules listed in ``COMMAND_MODULES`` and is imported by none of them.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from .cli_common import (
    COMMANDS,
    add_eval_arguments,
    add_model_arguments,
    evaluate_row,
    load_from_args,
    print_rows,
    register_command,
)
from .core.data import DataUnavailableError

# modules whose import registers subcommands (a method package registers its CLI on import)
COMMAND_MODULES = ("effml.quant", "effml.prune", "effml.recursive", "effml.compose", "effml.demo",
                   "effml.export")

# errors that mean "the input was wrong" (a missing file or package, a bad option value or
# checkpoint, data that cannot be fetched): one line and exit 2. Anything else (RuntimeError
# from torch, KeyError, TypeError, ...) is a bug and keeps its traceback.
USER_ERRORS = (ValueError, OSError, ModuleNotFoundError, DataUnavailableError)


def _add_eval(p):
    add_model_arguments(p)
    add_eval_arguments(p)


def _run_eval(args) -> int:
    model, tokenizer = load_from_args(args)
    print_rows([evaluate_row(args.model, model, tokenizer, args)], args)
    return 0


register_command("eval", "perplexity and size of a model", _add_eval, _run_eval)


def build_parser() -> argparse.ArgumentParser:
    for module in COMMAND_MODULES:
        importlib.import_module(module)
    parser = argparse.ArgumentParser(prog="effml", description="compress HuggingFace causal LMs")
    parser.add_argument("-v", "--verbose", action="store_true", help="log per-layer progress")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, add_arguments, _) in sorted(COMMANDS.items()):
        add_arguments(sub.add_parser(name, help=help_text))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return COMMANDS[args.command][2](args)
    except USER_ERRORS as e:
        # one line: messages say what to pass; -v shows the traceback
        if args.verbose:
            raise
        print(f"effml: error: {' '.join(str(e).split()) or type(e).__name__}", file=sys.stderr)
        return 2
