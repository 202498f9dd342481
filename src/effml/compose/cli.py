"""``effml compress --model M --recipe FILE --out DIR``: run a recipe of steps and save the result."""

from __future__ import annotations

import argparse

from ..cli_common import (
    add_eval_arguments,
    add_model_arguments,
    evaluate_row,
    load_from_args,
    print_rows,
    register_command,
)


def _add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    add_eval_arguments(p)
    p.add_argument("--recipe", required=True,
                   help='.json or .yaml file: a list of steps, e.g. [{"prune": {"sparsity": 0.5}}, '
                        '{"quantize": {"method": "gptq", "w_bits": 4}}]')
    p.add_argument("--out", required=True, help="save the compressed model to this folder (effml.save)")
    p.add_argument("--calib", default="wikitext2", help="calibration text: wikitext2, c4, a file, or self")
    p.add_argument("--calib-samples", type=int, default=32, help="calibration windows (steps that calibrate)")
    p.add_argument("--calib-seq-len", type=int, default=512, help="calibration window length")
    p.add_argument("--seed", type=int, default=0, help="calibration sampling seed")
    p.add_argument("--no-eval", action="store_true", help="skip the perplexity evaluation")


def history_rows(model) -> list[dict]:
    from ..core.report import history

    rows = []
    for i, e in enumerate(history(model)):
        rows.append({
            "#": i, "step": e["step"], "method": e["method"], "seconds": e["seconds"],
            "sparsity": None if e["sparsity"] is None else round(e["sparsity"], 4),
            "linear bits/w": e["linear_bits_per_weight"], "bits/weight": e["bits_per_weight"],
            "parameters": e["parameters"], "MB": round(e["bytes"] / 2**20, 2),
        })
    return rows


def _run(args) -> int:
    import effml

    from ..core.table import format_table
    from .api import run_steps
    from .validate import validate_recipe

    steps = validate_recipe(args.recipe, require_calib=False)  # options and order, before the slow load
    # calibrate on the device the model is loaded on, as `effml prune` / `effml quantize` do
    defaults = {"device": args.device} if any(s.kind in ("prune", "quantize") for s in steps) else None
    model, tok = load_from_args(args)
    steps = validate_recipe(args.recipe, model, require_calib=False, defaults=defaults)
    calib = None
    if any(s.needs_calib for s in steps):
        calib = effml.calibration_data(tok, args.calib, n_samples=args.calib_samples, seq_len=args.calib_seq_len,
                                       seed=args.seed, model=model)
    run_steps(model, steps, calib)
    print(format_table(history_rows(model)))
    effml.save(model, args.out, tokenizer=tok)
    print(f"saved to {args.out}")
    if not args.no_eval:
        name = f"{args.model} " + " -> ".join(f"{s.kind}:{s.method}" for s in steps)
        print_rows([evaluate_row(name, model, tok, args)], args)
    return 0


register_command("compress", "run a recipe of prune / quantize / recursify steps and save the model",
                 _add_arguments, _run)
