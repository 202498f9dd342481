"""The main job (``./run.sh main`` / ``effml demo``): the default model, compressed by each
registered method's quick CPU recipe, evaluated side by side in one table.

Methods add a step with :func:`register_demo_step`; each step gets a private copy of the model.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

# name -> fn(model, tokenizer) -> compressed model
_STEPS: dict[str, Callable] = {}


def register_demo_step(name: str, fn: Callable) -> None:
    _STEPS[name] = fn


def add_arguments(p) -> None:
    from .cli import add_eval_arguments, add_model_arguments

    add_model_arguments(p)
    add_eval_arguments(p)
    p.set_defaults(max_windows=16)
    p.add_argument("--steps", default=None, help="comma-separated subset of the demo steps to run")


def run(args) -> int:
    from .cli import evaluate_row, load_from_args, print_rows

    start = time.perf_counter()
    model, tok = load_from_args(args)
    rows = [evaluate_row(f"{args.model} (original)", model, tok, args)]
    wanted = args.steps.split(",") if args.steps else list(_STEPS)
    unknown = [s for s in wanted if s not in _STEPS]
    if unknown:
        raise ValueError(f"unknown demo steps {unknown}; available: {sorted(_STEPS)}")
    for name in wanted:
        t = time.perf_counter()
        compressed = _STEPS[name](copy.deepcopy(model), tok)
        row = evaluate_row(name, compressed, tok, args)
        row["compress_s"] = round(time.perf_counter() - t - row["eval_s"], 1)
        rows.append(row)
        del compressed
    print_rows(rows, args)
    print(f"total {time.perf_counter() - start:.0f} s")
    return 0
