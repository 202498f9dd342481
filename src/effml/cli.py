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
    p.add_argument("--out", dest="json", default=None, help="same as --json")
    p.add_argument("--tasks", default=None,
                   help="comma-separated lm-eval tasks shipped with effml (wikitext2_local) to run through "
                        "lm-evaluation-harness instead of the perplexity; needs pip install 'effml[eval]'")
    p.add_argument("--limit", type=int, default=None, help="with --tasks: evaluate only the first N documents")
    p.add_argument("--max-length", type=int, default=None,
                   help="with --tasks: rolling window in tokens (default: the model's context length)")
    p.add_argument("--batch-size", type=int, default=1, help="with --tasks: windows per forward pass")


def _run_tasks(args) -> int:
    import time

    from .core.harness import check_task_arguments, evaluate_tasks, import_lm_eval

    # a missing lm-eval or a bad task name is refused before the model loads
    import_lm_eval()
    tasks = check_task_arguments(args.tasks, args.limit, args.batch_size, args.max_length)
    model, tokenizer = load_from_args(args)
    lm_log = logging.getLogger("lm_eval")
    level = lm_log.level
    if not args.verbose:  # lm-eval warns about every in-memory model and custom data set it is given
        lm_log.setLevel(logging.ERROR)
    start = time.perf_counter()
    try:
        results = evaluate_tasks(model, tokenizer, tasks, limit=args.limit, batch_size=args.batch_size,
                                 max_length=args.max_length)
    finally:
        lm_log.setLevel(level)
    seconds = round(time.perf_counter() - start, 1)
    rows = [{"model": args.model, "task": task, **{k: round(v, 4) if isinstance(v, float) else v
                                                   for k, v in metrics.items()}, "eval_s": seconds}
            for task, metrics in results.items()]
    print_rows(rows, args)
    return 0


def _run_eval(args) -> int:
    if args.tasks is not None:
        return _run_tasks(args)
    for flag in ("limit", "max_length"):
        if getattr(args, flag) is not None:
            raise ValueError(f"--{flag.replace('_', '-')} applies to --tasks only")
    model, tokenizer = load_from_args(args)
    print_rows([evaluate_row(args.model, model, tokenizer, args)], args)
    return 0


register_command("eval", "perplexity and size of a model, or lm-eval tasks (--tasks)", _add_eval, _run_eval)


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
