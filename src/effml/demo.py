"""The main job (``./run.sh main`` / ``effml demo``): the default model, compressed by each
registered method's quick CPU recipe, evaluated side by side in one table.

Methods add a step with :func:`register_demo_step`; each step gets a private copy of the model.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable

from .cli_common import (
    add_eval_arguments,
    add_model_arguments,
    evaluate_row,
    load_from_args,
    print_rows,
    register_command,
)

log = logging.getLogger(__name__)

# name -> fn(model, tokenizer) -> compressed model
_STEPS: dict[str, Callable] = {}


def register_demo_step(name: str, fn: Callable) -> None:
    _STEPS[name] = fn


def _calib(tok, n_samples=16, seq_len=512):
    from .core import calibration_data

    return calibration_data(tok, "wikitext2", n_samples=n_samples, seq_len=seq_len, seed=0)


def _prune_wanda_alpha(model, tok):
    from . import prune

    return prune(model, 0.5, method="wanda", allocation="alpha", calib=_calib(tok))


def _quant_gptq_w4a16(model, tok):
    from .quant import quantize

    return quantize(model, "gptq", w_bits=4, calib=_calib(tok))


def _recursify_uptrain(model, tok):
    from .recursive import recursify
    from .recursive.uptrain import uptrain

    teacher = copy.deepcopy(model)
    student = recursify(model, num_loops=2, strategy="cycle", init="average", lora_rank=16)
    uptrain(student, teacher, _calib(tok, n_samples=32, seq_len=128), steps=20, lr=1e-3, batch_size=2)
    return student.eval()


# The quick CPU recipe of each method (each runs on its own copy of the model).
register_demo_step("prune: wanda + alpha, 50%", _prune_wanda_alpha)
register_demo_step("quantize: gptq W4A16", _quant_gptq_w4a16)
register_demo_step("recursify: B=2 avg rank16 + 20 KD steps", _recursify_uptrain)


def add_arguments(p) -> None:
    add_model_arguments(p)
    add_eval_arguments(p)
    p.set_defaults(max_windows=16)
    p.add_argument("--steps", default=None, help="comma-separated subset of the demo steps to run")


def run(args) -> int:
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


register_command("demo", "the main job: compress the default model with each method and compare", add_arguments, run)
