"""``effml recursify`` and ``effml uptrain``."""

from __future__ import annotations

import argparse
import json

from ..cli_common import (
    add_eval_arguments,
    add_model_arguments,
    evaluate_row,
    load_from_args,
    print_rows,
    register_command,
)
from .config import BUDGET_METRICS, INITS, LORA_INITS, STRATEGIES
from .losses import KD_KINDS


def _rank(text: str):
    if text == "full":
        return "full"
    try:
        return int(text)
    except ValueError:
        pass
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"--lora-rank takes an int, 'full' or a JSON object like '{{\"q\": 16}}', got {text!r}") from e
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"--lora-rank JSON must be an object role -> rank, got {text!r}")
    return value


def _tie(text: str):
    values = {"true": True, "false": False, "foldable": "foldable"}
    if text not in values:
        raise argparse.ArgumentTypeError(f"--tie-norms takes true, false or foldable, got {text!r}")
    return values[text]


def _add_recursify(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    add_eval_arguments(p)
    p.add_argument("--num-loops", type=int, default=2, help="B: how many times the shared stack runs")
    p.add_argument("--strategy", default="cycle", choices=STRATEGIES)
    p.add_argument("--init", default="stepwise", choices=INITS)
    p.add_argument("--lora-rank", type=_rank, default=0, help="int, 'full', or JSON per role, e.g. '{\"q\": 16, \"down\": 64}'")
    p.add_argument("--lora-init", default=None, choices=LORA_INITS,
                   help="svd (paper), asvd (activation-aware: weights the residual by calibration inputs) or zero; "
                        "default: asvd on --calib-data")
    p.add_argument("--param-budget", type=float, default=None,
                   help="fraction in (0, 1) of the original non-embedding parameters: choose the LoRA ranks per depth "
                        "and target to fit it (instead of --lora-rank; uses --calib-data)")
    p.add_argument("--budget-metric", default="relative", choices=BUDGET_METRICS,
                   help="how --param-budget weighs a LoRA component: residual energy relative to the linear's output "
                        "energy (default) or absolute")
    p.add_argument("--calib-data", default="wikitext2", help="asvd / budget calibration text: wikitext2, c4 or a text file")
    p.add_argument("--n-samples", type=int, default=16, help="asvd / budget calibration windows")
    p.add_argument("--calib-seq-len", type=int, default=512, help="asvd / budget calibration window length")
    p.add_argument("--lora-targets", nargs="+", default=None, help="roles to relax (default: q k v o gate up down)")
    p.add_argument("--tie-norms", type=_tie, default=True, choices=[True, False, "foldable"],
                   help="true, false or foldable (tie only norms that feed a projection)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="folder to write the recursive model to (effml.save)")
    p.add_argument("--eval", action="store_true", help="also report perplexity before and after")


def _run_recursify(args) -> int:
    import copy

    import effml

    from .config import RecursiveConfig
    from .convert import recursify

    kw = {} if args.lora_targets is None else {"lora_targets": tuple(args.lora_targets)}
    # check the settings before spending time on loading the model
    cfg = RecursiveConfig(args.num_loops, args.strategy, args.init, args.lora_rank, args.lora_init,
                          tie_norms=args.tie_norms, seed=args.seed, param_budget=args.param_budget,
                          budget_metric=args.budget_metric, **kw)
    model, tok = load_from_args(args)
    rows = [evaluate_row(args.model, model, tok, args)] if args.eval else []
    if (cfg.relaxed and args.lora_init in (None, "asvd")) or args.param_budget is not None:
        kw["calib"] = effml.calibration_data(tok, args.calib_data, n_samples=args.n_samples,
                                             seq_len=args.calib_seq_len, seed=args.seed)
    rec = recursify(copy.deepcopy(model) if args.eval else model, num_loops=args.num_loops, strategy=args.strategy,
                    init=args.init, lora_rank=args.lora_rank, lora_init=args.lora_init, tie_norms=args.tie_norms,
                    seed=args.seed, param_budget=args.param_budget, budget_metric=args.budget_metric, **kw)
    report = rec.effml_report["recursify"]
    if args.eval:
        rows.append(evaluate_row("recursive", rec, tok, args))
    effml.save(rec, args.out, tokenizer=tok)
    print(_report_line(report))
    if rows:
        print_rows(rows, args)
    print(f"saved to {args.out}")
    return 0


def _report_line(report: dict) -> str:
    b, a = report["before"], report["after"]
    line = (f"non-embedding parameters {b['non_embedding']:,} -> {a['non_embedding']:,} "
            f"(-{100 * report['non_embedding_reduction']:.1f}%; shared blocks {a['blocks']:,}, LoRA {a['lora']:,}, "
            f"embeddings {a['embeddings']:,})")
    if report.get("rank_caps"):
        line += "\nrank capped: " + "; ".join(report["rank_caps"])
    alloc = report.get("allocation")
    if alloc:
        line += (f"\nparam_budget {alloc['param_budget']:g}: {alloc['params_used']:,} of {alloc['budget_params']:,} "
                 f"parameters; LoRA ranks summed over depths {alloc['rank_totals']}")
    return line


def _add_uptrain(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)  # --model is the teacher (the original model)
    add_eval_arguments(p)
    p.add_argument("--student", required=True, help="folder written by `effml recursify`")
    p.add_argument("--out", required=True, help="folder to write the uptrained student to")
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--kd", default="forward_kl", choices=KD_KINDS)
    p.add_argument("--kd-weight", type=float, default=1.0)
    p.add_argument("--ce-weight", type=float, default=0.0)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--warmup-steps", type=int, default=None)
    p.add_argument("--train-data", default="wikitext2", help="calibration text: wikitext2, c4 or a text file")
    p.add_argument("--train-seq-len", type=int, default=512)
    p.add_argument("--n-samples", type=int, default=512)
    p.add_argument("--early-exit", action="store_true", help="add the Agg(c) self-distillation loss at loop ends")
    p.add_argument("--early-exit-weight", type=float, default=0.1)
    p.add_argument("--checkpoint-dir", default=None)
    p.add_argument("--checkpoint-every", type=int, default=None)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval", action="store_true", help="perplexity before and after")


def _run_uptrain(args) -> int:
    import effml

    from .uptrain import uptrain

    teacher, tok = load_from_args(args)
    student = effml.load(args.student, device=args.device)
    data = effml.calibration_data(tok, args.train_data, n_samples=args.n_samples, seq_len=args.train_seq_len, seed=args.seed)
    eval_fn = None
    if args.eval:
        def eval_fn(m):
            return {"ppl": effml.perplexity(m, tok, text=args.data, seq_len=args.seq_len, max_windows=args.max_windows)}
    summary = uptrain(student, teacher, data, steps=args.steps, lr=args.lr, kd=args.kd, ce_weight=args.ce_weight,
                      kd_weight=args.kd_weight, batch_size=args.batch_size, warmup_steps=args.warmup_steps,
                      early_exit=args.early_exit, early_exit_weight=args.early_exit_weight,
                      checkpoint_dir=args.checkpoint_dir, checkpoint_every=args.checkpoint_every, resume=args.resume,
                      gradient_checkpointing=args.gradient_checkpointing, seed=args.seed, eval_fn=eval_fn)
    report = dict(getattr(student, "effml_report", None) or {})
    report["uptrain"] = {"config": summary["config"], "evals": summary["evals"],
                         "loss_first": summary["history"][0]["loss"] if summary["history"] else None,
                         "loss_last": summary["history"][-1]["loss"] if summary["history"] else None}
    student.effml_report = report
    effml.save(student, args.out, tokenizer=tok)
    h = summary["history"]
    rows = [{"step": e["step"], **{k: round(v, 4) for k, v in e.items() if k != "step"}} for e in summary["evals"]]
    if h:
        print(f"loss {h[0]['loss']:.4f} (step {h[0]['step']}) -> {h[-1]['loss']:.4f} (step {h[-1]['step']})")
    if rows:
        print_rows(rows, args)
    print(f"saved to {args.out}")
    return 0


register_command("recursify", "tie layers into a (relaxed) recursive transformer", _add_recursify, _run_recursify)
register_command("uptrain", "distil the original model into a recursive one", _add_uptrain, _run_uptrain)
