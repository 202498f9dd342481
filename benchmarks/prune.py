"""AlphaPruning benchmark (SmolLM2-135M by default, ``--model gemma3-270m``): ESD speed and alpha vs WeightWatcher, then WikiText-2
perplexity for magnitude / Wanda / SparseGPT x uniform / OWL / alpha allocation, N:M, and an
epsilon sweep. Rows are appended to the JSON as they finish, and a rerun skips rows already there.

    OMP_NUM_THREADS=1 python benchmarks/prune.py --preset cpu
    OMP_NUM_THREADS=1 python benchmarks/prune.py --model gemma3-270m --max-windows 4 \
        --stages dense,auto,grid2 --out benchmarks/results/prune_gemma3.json

Stage ``required_auto``: issue 19's required rows (uniform and default alpha, 60/70%); ``auto``: alpha allocation with its default ``epsilon="auto"`` (Wanda / SparseGPT, 50-70%);
``grid2``: the Wanda / SparseGPT part of ``grid`` (uniform / OWL / alpha at the paper's 0.3).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import torch

import effml
from effml.core.table import format_table
from effml.prune.esd import clear_cache

PRESETS = {
    # CPU: 16 x 512 calibration tokens (the reference uses 128 x 2048); required rows first
    "cpu": dict(calib_samples=16, calib_len=512, threads=1),
    "gpu": dict(calib_samples=128, calib_len=2048, threads=None),
}
PRESETS["paper"] = PRESETS["gpu"]

REQUIRED = [
    ("wanda", "uniform", 0.6, None, 0.3), ("wanda", "alpha", 0.6, None, 0.3),
    ("wanda", "uniform", 0.7, None, 0.3), ("wanda", "alpha", 0.7, None, 0.3), ("wanda", "owl", 0.7, None, 0.3),
    ("sparsegpt", "uniform", 0.6, None, 0.3), ("sparsegpt", "alpha", 0.6, None, 0.3),
    ("sparsegpt", "uniform", 0.7, None, 0.3), ("sparsegpt", "alpha", 0.7, None, 0.3),
]
NM = [("magnitude", "uniform", None, "2:4", 0.3), ("wanda", "uniform", None, "2:4", 0.3), ("wanda", "uniform", None, "4:8", 0.3),
      ("wanda", "alpha", None, "4:8", 0.3), ("sparsegpt", "uniform", None, "2:4", 0.3),
      ("sparsegpt", "uniform", None, "4:8", 0.3), ("sparsegpt", "alpha", None, "4:8", 0.3)]
GRID = [(m, a, s, None, 0.3) for s in (0.7, 0.6, 0.5) for m in ("magnitude", "wanda", "sparsegpt")
        for a in ("uniform", "owl", "alpha")]
GRID2 = [g for g in GRID if g[0] != "magnitude"]
AUTO = [(m, "alpha", s, None, "auto") for s in (0.7, 0.6, 0.5) for m in ("wanda", "sparsegpt")]
# issue 19's required lines: the default (auto) alpha vs uniform at 60% and 70%, both pruners
REQUIRED_AUTO = [(m, a, s, None, e) for m in ("wanda", "sparsegpt") for s in (0.7, 0.6)
                 for a, e in (("uniform", 0.3), ("alpha", "auto"))]


def run_key(method, allocation, sparsity, pattern, epsilon) -> str:
    eps = f"/eps{epsilon}" if allocation == "alpha" else ""
    return f"{method}/{allocation}/{pattern or sparsity}{eps}"


def esd_vs_weightwatcher(model, log, threads: int) -> dict:
    """Both tools on the same ``threads`` cores: torch threads / effml's eigenvalue workers and
    the BLAS pool WeightWatcher's scipy SVD uses."""
    try:
        import weightwatcher as ww
        from threadpoolctl import threadpool_limits  # installed with weightwatcher (scikit-learn)
    except ImportError as e:
        raise SystemExit("the ESD comparison needs WeightWatcher (benchmark-only): pip install weightwatcher") from e
    logging.getLogger("weightwatcher").setLevel(logging.ERROR)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with threadpool_limits(threads):
            return _esd_vs_ww(model, log, ww, threads)
    finally:
        torch.set_num_threads(old)


def _esd_vs_ww(model, log, ww, threads) -> dict:
    out = {"threads": threads}
    for xmin in ("peak", "scan"):
        clear_cache()
        t = time.perf_counter()
        res = effml.esd(model, xmin=xmin, keep_eigenvalues=False)
        out[f"effml_esd_{xmin}_s"] = time.perf_counter() - t
    blocks = model.model.layers  # the 210 decoder linears, as AlphaPruning analyses them
    t = time.perf_counter()
    details = ww.WeightWatcher(model=blocks).analyze(plot=False)
    out["weightwatcher_analyze_s"] = time.perf_counter() - t
    ww_alpha = {f"model.layers.{name}": a for name, a in zip(details["longname"], details["alpha"])}
    diffs = []
    for r in res:
        if r.name not in ww_alpha:
            raise SystemExit(f"WeightWatcher did not analyse {r.name}")
        diffs.append(abs(r.alpha - ww_alpha[r.name]))
    diffs = np.array(diffs)
    out.update(
        matrices=len(res), ww_matrices=len(details), max_abs_alpha_diff=float(diffs.max()),
        mean_abs_alpha_diff=float(diffs.mean()), all_within_1e_3=bool((diffs < 1e-3).all()),
        speedup_peak=out["weightwatcher_analyze_s"] / out["effml_esd_peak_s"],
        speedup_scan=out["weightwatcher_analyze_s"] / out["effml_esd_scan_s"],
    )
    log.info("ESD vs WW: %s", out)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="cpu", choices=sorted(PRESETS))
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--out", default="benchmarks/results/prune.json")
    p.add_argument("--stages", default="esd,dense,required,epsilon,nm,grid",
                   help="comma list of: esd, dense, required, epsilon, nm, grid")
    p.add_argument("--epsilons", default="0.2,0.5,0.1,0.4", help="epsilon sweep (Wanda, alpha, 70%%)")
    p.add_argument("--max-windows", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--esd-threads", type=int, default=2, help="cores for the ESD / WeightWatcher timing")
    p.add_argument("--plot", default=None, help="also save the ESD figure with the 70%% alpha allocation (PNG)")
    p.add_argument("--reverse", action="store_true",
                   help="run the planned rows last to first (a second process meeting the first in the middle)")
    p.add_argument("--skip-done-in", nargs="*", default=[], help="rows already in these result JSONs count as done")
    p.add_argument("--markdown", nargs="*", default=None, metavar="JSON",
                   help="only print the grid of result files (default: --out), merged, as Markdown")
    args = p.parse_args(argv)
    if args.markdown is not None:
        runs = [json.loads(Path(f).read_text()) for f in (args.markdown or [args.out])]
        print(markdown_grid({"rows": [r for run in runs for r in run["rows"]]}))
        return 0
    preset = PRESETS[args.preset]
    if preset["threads"]:
        torch.set_num_threads(preset["threads"])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    log = logging.getLogger("bench.prune")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    data = json.loads(out.read_text()) if out.exists() else {}
    data.update(preset=args.preset, calib=[preset["calib_samples"], preset["calib_len"]],
                eval=dict(data="wikitext2 test", seq_len=args.seq_len, max_windows=args.max_windows))
    rows = data.setdefault("rows", [])
    done = {r["run"] for r in rows}

    def save():
        out.write_text(json.dumps(data, indent=1))

    base, tok = effml.load_model(args.model, device=args.device)
    data["model"] = args.model
    stages = args.stages.split(",")
    if "esd" in stages and "esd" not in data:
        data["esd"] = esd_vs_weightwatcher(base, log, args.esd_threads)
        save()
    if args.plot:
        res = effml.esd(base)
        blocks = res.per_block()
        sizes = [sum(r.n_params for r in res if r.block == b) for b in blocks]
        alloc = effml.prune.alpha_allocation(list(blocks.values()), sizes, 0.7, 0.3)
        print(f"ESD figure: {effml.plot_esd(res, args.plot, sparsity=list(alloc))}")
    calib = effml.calibration_data(tok, "wikitext2", preset["calib_samples"], preset["calib_len"], seed=0)

    def evaluate(model):
        t = time.perf_counter()
        ppl = effml.perplexity(model, tok, seq_len=args.seq_len, max_windows=args.max_windows, progress=False)
        return ppl, time.perf_counter() - t

    if "dense" in stages and "dense" not in done:
        ppl, es = evaluate(base)
        rows.append(dict(run="dense", method="dense", allocation="-", sparsity=0.0, pattern=None, epsilon=None,
                         ppl=ppl, achieved=0.0, prune_s=0.0, eval_s=es))
        save()
    sweep = [("wanda", "alpha", 0.7, None, float(e)) for e in args.epsilons.split(",")]
    plan = {"required": REQUIRED, "epsilon": sweep, "nm": NM, "grid": GRID, "grid2": GRID2, "auto": AUTO,
            "required_auto": REQUIRED_AUTO}
    for other in args.skip_done_in:
        if Path(other).exists():
            done.update(r["run"] for r in json.loads(Path(other).read_text())["rows"])
    todo = [spec for stage in stages for spec in plan.get(stage, [])]
    for method, allocation, sparsity, pattern, eps in reversed(todo) if args.reverse else todo:
        key = run_key(method, allocation, sparsity, pattern, eps)
        if key in done:
            continue
        model = copy.deepcopy(base)
        t = time.perf_counter()
        effml.prune(model, sparsity, method=method, allocation=allocation, epsilon=eps, pattern=pattern,
                    calib=calib if (method != "magnitude" or allocation == "owl") else None, device=args.device)
        prune_s = time.perf_counter() - t
        rep = model.effml_report["prune"]
        ppl, es = evaluate(model)
        blocks = {}
        for layer in rep["layers"]:
            blocks.setdefault(layer["block"], layer["target"])
        row = dict(run=key, method=method, allocation=allocation, sparsity=rep["target_sparsity"], pattern=pattern,
                   epsilon=eps if allocation == "alpha" else None, ppl=ppl, achieved=rep["achieved_sparsity"],
                   min_block=min(blocks.values()), max_block=max(blocks.values()), prune_s=prune_s, eval_s=es)
        log.info("%s: ppl %.3f (achieved %.4f, prune %.0fs, eval %.0fs)", key, ppl, row["achieved"], prune_s, es)
        if allocation == "alpha":
            row["epsilon_used"] = rep.get("epsilon", eps)
        rows.append(row)
        done.add(key)
        save()
        del model
    cols = ["run", "ppl", "achieved", "min_block", "max_block", "prune_s", "eval_s"]
    print(format_table(rows, cols))
    if "esd" in data:
        print(format_table([data["esd"]]))
    print(f"wrote {out}")
    return 0


def markdown_grid(data: dict) -> str:
    """Perplexity per pruner x allocation (columns: sparsity / pattern); alpha at the paper's
    eps 0.3, and "alpha (auto)" with the default ``epsilon="auto"`` where measured."""
    rows = {r["run"]: r for r in data["rows"]}
    cols = [("50%", 0.5, None), ("60%", 0.6, None), ("70%", 0.7, None), ("2:4", None, "2:4"), ("4:8", None, "4:8")]
    table = []
    for method in ("magnitude", "wanda", "sparsegpt"):
        for alloc, eps in (("uniform", 0.3), ("owl", 0.3), ("alpha", 0.3), ("alpha", "auto")):
            cells = {name: rows.get(run_key(method, alloc, sp, pat, eps)) for name, sp, pat in cols}
            if any(cells.values()):
                table.append({"pruner": method, "allocation": alloc if eps != "auto" else "alpha (auto)",
                              **{k: f"{v['ppl']:.4g}" if v else "-" for k, v in cells.items()}})
    dense = rows.get("dense")
    head = f"dense: {dense['ppl']:.4g}\n\n" if dense else ""
    return head + format_table(table, markdown=True)


if __name__ == "__main__":
    os.environ.setdefault("TQDM_DISABLE", "1")
    raise SystemExit(main())
