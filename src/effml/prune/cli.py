"""``effml prune ...`` and ``effml esd ...`` subcommands."""

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
from .allocation import ALLOCATIONS, AUTO_EPSILON, check_epsilon_setting
from .config import GRANULARITIES, METHODS
from .esd import METRICS
from .powerlaw import XMIN_STRATEGIES


def _epsilon(text: str) -> float | str:
    if text == AUTO_EPSILON:
        return text
    try:
        value: float | str = float(text)
    except ValueError:
        value = text  # check_epsilon_setting names the bad text
    try:
        return check_epsilon_setting(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _add_prune(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    add_eval_arguments(p)
    p.add_argument("--sparsity", type=float, default=None, help="target in [0, 1) (implied by --pattern)")
    p.add_argument("--method", default="wanda", choices=METHODS)
    p.add_argument("--allocation", default="alpha", choices=ALLOCATIONS)
    p.add_argument("--epsilon", type=_epsilon, default=AUTO_EPSILON,
                   help="alpha allocation range: a number in [0, 1) (0.3 = the paper's default) or 'auto' (default: "
                        "effml picks 0, 0.1, ..., 0.4 by a one-shot Wanda proxy's calibration loss; needs --calib "
                        "data even for magnitude)")
    p.add_argument("--pattern", default=None, help="N:M, e.g. 2:4 or 4:8 (default unstructured)")
    p.add_argument("--metric", default="alpha_hill", choices=tuple(METRICS))
    p.add_argument("--xmin", default="peak", choices=XMIN_STRATEGIES)
    p.add_argument("--granularity", default="block", choices=GRANULARITIES)
    p.add_argument("--calib", default="wikitext2", help="calibration text: wikitext2, c4, a file, or self")
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--calib-len", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", "--save", dest="save", default=None, help="write the pruned model to this folder (effml.save)")
    p.add_argument("--no-eval", action="store_true", help="skip the perplexity evaluation")


def _run_prune(args) -> int:
    import effml

    from .api import prune
    from .config import PruneConfig

    # validate before the (slow) model load
    cfg = PruneConfig(sparsity=args.sparsity, method=args.method, allocation=args.allocation, epsilon=args.epsilon,
                      pattern=args.pattern, metric=args.metric, xmin=args.xmin, granularity=args.granularity)
    model, tok = load_from_args(args)
    calib = None
    if cfg.needs_data:
        calib = effml.calibration_data(tok, args.calib, args.calib_samples, args.calib_len, args.seed, model=model)
    prune(model, args.sparsity, method=args.method, allocation=args.allocation, epsilon=args.epsilon,
          pattern=args.pattern, calib=calib, metric=args.metric, xmin=args.xmin, granularity=args.granularity,
          device=args.device)
    rep = model.effml_report["prune"]
    print(f"achieved sparsity {rep['achieved_sparsity']:.4f} (target {rep['target_sparsity']:.4f}) in {rep['seconds']}s")
    if "auto_epsilon" in rep:
        auto = rep["auto_epsilon"]
        losses = ", ".join(f"{e:g}: {v:.4f}" for e, v in zip(auto["candidates"], auto["proxy_losses"]) if v is not None)
        print(f"epsilon auto -> {auto['chosen']:g} (proxy NLL {{{losses}}}, {auto['seconds']:.1f}s)")
    if args.save:
        effml.save(model, args.save, tokenizer=tok)
        print(f"saved to {args.save}")
    if not args.no_eval:
        name = f"{args.method}/{args.allocation}/{args.pattern or rep['target_sparsity']}"
        print_rows([evaluate_row(name, model, tok, args)], args)
    return 0


def _add_esd(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--xmin", default="peak", choices=XMIN_STRATEGIES)
    p.add_argument("--compat", action="store_true", help="reproduce the reference's peak lower-bound bug")
    p.add_argument("--csv", default=None, help="write the per-matrix records as CSV")
    p.add_argument("--json", default=None, help="write the per-matrix records as JSON")
    p.add_argument("--plot", default=None, help="save the ESD figure (PNG, needs matplotlib)")


def _run_esd(args) -> int:
    from .esd import esd
    from .plot import plot_esd

    model, _ = load_from_args(args)
    res = esd(model, xmin=args.xmin, compat=args.compat)
    print(f"ESD of {len(res)} matrices in {res.seconds:.2f}s")
    per_block = res.per_block()
    print_rows([{"block": b, "mean alpha": round(a, 3)} for b, a in per_block.items()], argparse.Namespace(json=None))
    if args.csv:
        res.to_csv(args.csv)
    if args.json:
        res.to_json(args.json)
    if args.plot:
        plot_esd(res, args.plot)
    return 0


register_command("prune", "prune a model (AlphaPruning / OWL / uniform x magnitude / Wanda / SparseGPT)", _add_prune, _run_prune)
register_command("esd", "spectral (ESD / power-law alpha) analysis of every decoder linear", _add_esd, _run_esd)
