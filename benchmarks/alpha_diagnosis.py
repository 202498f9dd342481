"""Why does AlphaPruning's allocation hurt on some models (issue 19: Gemma-3-270M, Wanda 60%)?

Per decoder block: the block-mean ESD alpha, the sparsity alpha allocation gives it, and its
sensitivity: the NLL increase when only that block is one-shot Wanda-pruned (masks from the dense
model's input norms), everything else dense, at the target sparsity and at its allocated one.
Then the Spearman rank correlation between the allocated sparsity and the inverse sensitivity
(positive: the allocation spares the sensitive blocks, as it should), and the first-order
prediction: sum over blocks of the NLL increase at the allocated ratios minus at uniform. All
the masked runs share one pass of the core engine (effml.prune.auto_epsilon.proxy_losses).

Optionally (--select) the epsilon="auto" proxy's choice at several sparsities with its cost, and
(--real) the real sequential Wanda runs (uniform / alpha at --epsilon / auto) on the same tokens.

    OMP_NUM_THREADS=2 python benchmarks/alpha_diagnosis.py --model gemma3-270m --select 0.6,0.7
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

import effml
from effml.core.data import load_text, tokenize_text
from effml.core.eval import eval_windows
from effml.core.table import format_table
from effml.prune.api import _alpha_ratios, _round_nm
from effml.prune.auto_epsilon import proxy_losses, select_epsilon
from effml.prune.config import PruneConfig
from effml.prune.units import prunable_units


def _rank_corr(a, b) -> float:
    return float(spearmanr(a, b).statistic)


def diagnose(model, tok, args, log) -> dict:
    units = prunable_units(model)
    blocks = sorted({u.block for u in units})
    block_of = np.array([u.block for u in units])
    t = time.perf_counter()
    cfg = PruneConfig(args.sparsity, epsilon=args.epsilon)
    alpha_ratios, metric_vals = _alpha_ratios(model, units, cfg)  # ESD (cached per process)
    esd_s = time.perf_counter() - t
    alloc = alpha_ratios(args.epsilon)
    alpha_of = {u.block: v for u, v in zip(units, metric_vals)}
    alloc_of = {u.block: float(r) for u, r in zip(units, alloc)}

    stats = effml.calibration_data(tok, "wikitext2", args.calib_samples, args.calib_len, seed=0)
    held = eval_windows(tokenize_text(tok, load_text("wikitext2", "test")), args.calib_len, args.eval_windows)
    S = args.sparsity
    # only block b pruned, at S (and at its allocated ratio with --at-alloc); then every block
    # pruned, uniformly and by alpha
    allocations = [(np.where(block_of == b, S, 0.0), None) for b in blocks]
    if args.at_alloc:
        allocations += [(np.where(block_of == b, alloc, 0.0), None) for b in blocks]
    allocations += [(np.full(len(units), S), None), (alloc, None)]
    t = time.perf_counter()
    res = proxy_losses(model, units, allocations, stats, held)
    proxy_s = time.perf_counter() - t
    nb = len(blocks)
    rows = []
    for i, b in enumerate(blocks):
        rows.append({"block": b, "alpha": alpha_of[b], "alloc_sparsity": alloc_of[b],
                     "dnll_at_target": res.losses[i] - res.dense_loss})
        if args.at_alloc:
            rows[-1]["dnll_at_alloc"] = res.losses[nb + i] - res.dense_loss
    sens = np.array([r["dnll_at_target"] for r in rows])
    sp = np.array([r["alloc_sparsity"] for r in rows])
    out = {
        "model": args.model, "sparsity": S, "epsilon": args.epsilon,
        "calib": [args.calib_samples, args.calib_len], "eval": f"{args.eval_windows} x {args.calib_len} WikiText-2 test",
        "dense_nll": res.dense_loss,
        "oneshot_uniform_nll": res.losses[-2], "oneshot_alpha_nll": res.losses[-1],
        "oneshot_alpha_over_uniform_ppl": math.exp(res.losses[-1] - res.losses[-2]),
        "first_order_alpha_minus_uniform": (float(sum(r["dnll_at_alloc"] - r["dnll_at_target"] for r in rows))
                                            if args.at_alloc else None),
        "spearman_sparsity_vs_inverse_sensitivity": _rank_corr(sp, -sens),
        "spearman_alpha_vs_sensitivity": _rank_corr([r["alpha"] for r in rows], sens),
        "alpha_range": [min(r["alpha"] for r in rows), max(r["alpha"] for r in rows)],
        "sensitivity_range": [float(sens.min()), float(sens.max())],
        "esd_s": esd_s, "diagnosis_proxy_s": proxy_s, "blocks": rows,
    }
    log.info("%s: rank corr(sparsity, 1/sensitivity) = %.3f", args.model, out["spearman_sparsity_vs_inverse_sensitivity"])
    return out


def select(model, tok, args, sparsity: float) -> dict:
    """The epsilon="auto" choice (its proxy is the same for every method) and its cost."""
    units = prunable_units(model)
    cfg = PruneConfig(sparsity)
    t = time.perf_counter()
    alpha_ratios, _ = _alpha_ratios(model, units, cfg)
    esd_s = time.perf_counter() - t  # ~0 once cached in this process
    calib = effml.calibration_data(tok, "wikitext2", args.select_samples, args.calib_len, seed=0)
    t = time.perf_counter()
    chosen, rep = select_epsilon(model, units, lambda e: _round_nm(alpha_ratios(e), units, cfg),
                                 cfg.epsilon_candidates, calib)
    return {"sparsity": sparsity, "calib": [args.select_samples, args.calib_len], "chosen": chosen,
            "wall_s": time.perf_counter() - t, "esd_s": esd_s, **rep}


def real_runs(model, tok, args, log) -> list[dict]:
    held = eval_windows(tokenize_text(tok, load_text("wikitext2", "test")), args.calib_len, args.eval_windows)
    calib = effml.calibration_data(tok, "wikitext2", args.select_samples, args.calib_len, seed=0)
    rows = []
    for name, kw in [("uniform", {"allocation": "uniform"}), (f"alpha eps {args.epsilon}", {"epsilon": args.epsilon}),
                     ("alpha auto", {})]:
        m = copy.deepcopy(model)
        t = time.perf_counter()
        effml.prune(m, args.sparsity, method="wanda", calib=calib, **kw)
        prune_s = time.perf_counter() - t
        ppl = effml.perplexity(m, tok, held.reshape(-1), seq_len=args.calib_len, progress=False)
        rep = m.effml_report["prune"]
        auto = rep.get("auto_epsilon") or {}
        rows.append({"run": name, "ppl": ppl, "epsilon": rep.get("epsilon"), "prune_s": prune_s,
                     "auto_s": auto.get("seconds"), "auto_losses": auto.get("proxy_losses")})
        log.info("real Wanda %s: ppl %.3f (%.0fs)", name, ppl, prune_s)
        del m
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="gemma3-270m")
    p.add_argument("--sparsity", type=float, default=0.6)
    p.add_argument("--epsilon", type=float, default=0.3, help="the fixed epsilon diagnosed (the paper's 0.3)")
    p.add_argument("--calib-samples", type=int, default=4, help="statistics windows of the diagnosis")
    p.add_argument("--calib-len", type=int, default=512)
    p.add_argument("--eval-windows", type=int, default=2, help="WikiText-2 test windows for the NLL")
    p.add_argument("--at-alloc", action="store_true",
                   help="also each block alone at its allocated ratio (first-order prediction; doubles the cost)")
    p.add_argument("--select", default="", help="comma list of sparsities at which to run the auto proxy")
    p.add_argument("--select-samples", type=int, default=32, help="calibration windows for --select / --real "
                                                                   "(32 x 512 = the CLI default)")
    p.add_argument("--real", action="store_true", help="also run the real Wanda pruning (uniform / fixed / auto)")
    p.add_argument("--no-diagnosis", action="store_true", help="reuse the per-block results already in --out")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None, help="default benchmarks/results/alpha_diagnosis_<model>.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("effml.core.calibrate").setLevel(logging.WARNING)
    log = logging.getLogger("bench.alpha_diagnosis")
    out_path = Path(args.out or f"benchmarks/results/alpha_diagnosis_{args.model}.json")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    model, tok = effml.load_model(args.model)
    with torch.no_grad():
        if args.no_diagnosis:  # keep the earlier per-block results, redo --select / --real
            data = json.loads(out_path.read_text())
        else:
            data = diagnose(model, tok, args, log)
            out_path.write_text(json.dumps(data, indent=1))
        if args.select:
            data["auto"] = [select(model, tok, args, float(s)) for s in args.select.split(",")]
            out_path.write_text(json.dumps(data, indent=1))
    if args.real:
        data["real_wanda"] = real_runs(model, tok, args, log)
        out_path.write_text(json.dumps(data, indent=1))
    table = [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()} for r in data["blocks"]]
    print(format_table(table))
    keys = ["dense_nll", "oneshot_uniform_nll", "oneshot_alpha_nll", "oneshot_alpha_over_uniform_ppl",
            "first_order_alpha_minus_uniform", "spearman_sparsity_vs_inverse_sensitivity",
            "spearman_alpha_vs_sensitivity", "esd_s", "diagnosis_proxy_s"]
    print(format_table([{k: (round(data[k], 4) if data[k] is not None else None) for k in keys}]))
    for a in data.get("auto", []):
        losses = ", ".join(f"{e:g}: {v:.4f}" for e, v in zip(a["candidates"], a["proxy_losses"]))
        print(f"auto at {a['sparsity']:g}: epsilon {a['chosen']:g} ({losses}) in {a['seconds']:.1f}s")
    if "real_wanda" in data:
        print(format_table([{k: v for k, v in r.items() if k != "auto_losses"} for r in data["real_wanda"]]))
    print(f"wrote {out_path}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TQDM_DISABLE", "1")
    raise SystemExit(main())
