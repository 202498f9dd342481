"""Relaxed Recursive Transformers on SmolLM2-135M: perplexity after conversion and after a short
distillation, with parameter counts.

    OMP_NUM_THREADS=1 python benchmarks/recursive.py --preset cpu --parts convert2 uptrain convert3

Parts: ``convert2`` / ``convert3`` = the B=2 / B=3 grid of init x strategy x LoRA rank (SVD
init) evaluated right after conversion; ``uptrain`` = short KD uptraining of a few configs,
evaluated before, during and after; ``aim`` = one longer uptraining of the issue's Aim setting
(B=2, FFN rank 64, smaller attention ranks so that >= 35% of the parameters go). ``--lora-init asvd`` runs the same parts with the
activation-aware SVD init (calibration 16 x 512 tokens of the WikiText-2 validation split);
rank-0 rows do not depend on the LoRA init and are shared. Rows are appended to the JSON as they finish, and a rerun
with the same --out skips what is already there (an earlier 4-window run is kept in
results/recursive_4windows.json).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import time
from pathlib import Path

import torch

import effml
from effml.core.table import format_table
from effml.recursive import input_grams, parameter_report, recursify, truncate_ranks, uptrain

AIM_RANKS = {"q": 32, "k": 16, "v": 16, "o": 32, "gate": 64, "up": 64, "down": 64}
PRESETS = {
    # 2 CPU cores: the first 16 windows of 1024 for every perplexity; uptraining on 256-token
    # windows, a rank sweep of the paper's main relaxed setting (Average, cycle) plus plain Stepwise
    "cpu": dict(windows=16, seq_len=1024, inits=("stepwise", "average", "lower"), strategies=("cycle", "sequence"),
                ranks=(0, 16, 64, 128),
                uptrain=[dict(init="average", strategy="cycle", rank=r) for r in (0, 16, 64, 128)]
                + [dict(init="stepwise", strategy="cycle", rank=0)],
                up_steps=30, up_batch=2, up_seq=256, up_samples=256, up_lr=3e-4, up_eval_every=None,
                # the Aim's setting: B=2, FFN rank 64 (the paper: cutting FFN rank hurts most, small
                # k/v ranks are nearly free) with attention ranks cut so >= 35% of the non-embedding
                # parameters go; a longer uptrain (75k tokens)
                aim=dict(init="average", strategy="cycle", rank=AIM_RANKS, steps=150, eval_every=50)),
    # one GPU: the same grid, longer uptraining for every B=2 cycle config
    "gpu": dict(windows=16, seq_len=1024, inits=("stepwise", "average", "lower"), strategies=("cycle", "sequence"),
                ranks=(0, 16, 64, 128),
                uptrain=[dict(init=i, strategy="cycle", rank=r) for i in ("stepwise", "average") for r in (0, 64, 128)],
                up_steps=1000, up_batch=16, up_seq=1024, up_samples=4096, up_lr=2e-4, up_eval_every=250,
                aim=dict(init="average", strategy="cycle", rank=AIM_RANKS, steps=2000, eval_every=500)),
}
COLUMNS = ["part", "B", "init", "strategy", "lora_init", "rank", "step", "ppl", "ppl_ratio", "non_emb_params", "non_emb_reduction",
           "lora_params", "seconds"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="cpu", choices=sorted(PRESETS))
    p.add_argument("--parts", nargs="+", default=["convert2", "uptrain", "convert3"],
                   choices=["convert2", "convert3", "uptrain", "aim"])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default="benchmarks/results/recursive.json")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--lora-init", default="svd", choices=["svd", "asvd"])
    p.add_argument("--ranks", type=int, nargs="+", default=None, help="LoRA ranks (default: the preset's)")
    p.add_argument("--up-lr", type=float, default=None, help="uptraining learning rate (default: the preset's)")
    p.add_argument("--uptrain-ranks", type=int, nargs="+", default=None,
                   help="only the preset's uptraining configs with these ranks")
    p.add_argument("--markdown", action="store_true", help="only print the tables of an existing --out JSON as Markdown")
    args = p.parse_args()
    if args.markdown:
        print(markdown_tables(json.loads(Path(args.out).read_text())))
        return
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = dict(PRESETS[args.preset])  # the command-line overrides below must not edit the preset
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = json.loads(out.read_text()) if out.is_file() else {"preset": args.preset, "rows": [], "curves": []}

    model, tok = effml.load_model(args.model, device=args.device)
    ppl = lambda m, w=cfg["windows"]: effml.perplexity(m, tok, seq_len=cfg["seq_len"], max_windows=w, progress=False)  # noqa: E731
    originals = result.setdefault("original", {})
    for w in sorted({cfg["windows"], 16}):
        if str(w) not in originals:
            t0 = time.perf_counter()
            originals[str(w)] = {"ppl": ppl(model, w), "windows": w, "non_emb_params": parameter_report(model)["non_embedding"],
                                 "seconds": time.perf_counter() - t0}
            _save(out, result)
        print(f"original on {w} windows: ppl {originals[str(w)]['ppl']:.3f}, non-embedding params "
              f"{originals[str(w)]['non_emb_params']}")
    base_ppl = originals[str(cfg["windows"])]["ppl"]
    lora_init = args.lora_init
    if args.ranks:
        cfg["ranks"] = tuple(args.ranks)
    if args.up_lr:
        cfg["up_lr"] = args.up_lr
    if args.uptrain_ranks:
        cfg["uptrain"] = [u for u in cfg["uptrain"] if u["rank"] in args.uptrain_ranks]
    result.update(preset=args.preset, config={k: v for k, v in cfg.items()})
    # rank 0 has no LoRA, so its rows serve every lora_init
    have = {(r["part"], r["B"], r["init"], r["strategy"], r["rank"]) for r in result["rows"]
            if r["rank"] == 0 or r.get("lora_init", "svd") == lora_init}
    relax_kw = {"lora_init": lora_init}
    if lora_init == "asvd":  # input statistics of the original model, computed once for every conversion
        relax_kw["grams"] = input_grams(model, effml.calibration_data(tok, "wikitext2", n_samples=16, seq_len=512,
                                                                      seed=0))

    def row(part, b, init, strategy, rank, m, t0, step=None, value=None):
        rep = m.effml_report["recursify"]
        value = ppl(m) if value is None else value
        r = {"part": part, "B": b, "init": init, "strategy": strategy, "lora_init": lora_init if rank else "-",
             "rank": rank, "step": step, "ppl": value,
             "ppl_ratio": value / base_ppl, "non_emb_params": rep["after"]["non_embedding"],
             "non_emb_reduction": rep["non_embedding_reduction"], "lora_params": rep["after"]["lora"],
             "seconds": time.perf_counter() - t0}
        result["rows"].append(r)
        _save(out, result)
        print(format_table([r], COLUMNS), flush=True)
        return r

    for part in args.parts:
        if part.startswith("convert"):
            b = int(part[-1])
            for init in cfg["inits"]:
                for strategy in cfg["strategies"]:
                    if all((part, b, init, strategy, r) in have for r in cfg["ranks"]):
                        continue
                    if (part, b, init, strategy, 0) not in have:
                        t0 = time.perf_counter()
                        m = recursify(copy.deepcopy(model), num_loops=b, strategy=strategy, init=init, lora_rank=0)
                        row(part, b, init, strategy, 0, m, t0)
                        del m
                    ranks = sorted((r for r in cfg["ranks"] if r > 0), reverse=True)
                    if not ranks:
                        continue
                    # one SVD per weight at the largest rank, then nested truncation (identical
                    # to converting at each rank, since truncated SVDs are nested)
                    t0 = time.perf_counter()
                    m = recursify(copy.deepcopy(model), num_loops=b, strategy=strategy, init=init, lora_rank=ranks[0],
                                  **relax_kw)
                    for r in ranks:
                        truncate_ranks(m, r)
                        if (part, b, init, strategy, r) in have:
                            continue
                        m.effml_report["recursify"]["after"] = parameter_report(m)
                        rep = m.effml_report["recursify"]
                        rep["non_embedding_reduction"] = 1 - rep["after"]["non_embedding"] / rep["before"]["non_embedding"]
                        row(part, b, init, strategy, r, m, t0)
                        t0 = time.perf_counter()
                    del m
        else:
            data = effml.calibration_data(tok, "wikitext2", n_samples=cfg["up_samples"], seq_len=cfg["up_seq"], seed=0)
            specs = cfg["uptrain"] if part == "uptrain" else [cfg["aim"]]
            for spec in specs:
                label = _rank_label(spec["rank"])
                if (part, 2, spec["init"], spec["strategy"], label) in have:
                    continue
                t0 = time.perf_counter()
                student = recursify(copy.deepcopy(model), num_loops=2, strategy=spec["strategy"], init=spec["init"],
                                    lora_rank=spec["rank"], **relax_kw)
                summary = uptrain(student, model, data, steps=spec.get("steps", cfg["up_steps"]), lr=cfg["up_lr"],
                                  batch_size=cfg["up_batch"], eval_every=spec.get("eval_every", cfg["up_eval_every"]),
                                  seed=0, eval_fn=lambda m: {"ppl": ppl(m)})
                for e in summary["evals"]:
                    row(part, 2, spec["init"], spec["strategy"], label, student, t0, e["step"], e["ppl"])
                result["curves"].append({**spec, "rank": label, "part": part, "B": 2,
                                         "lora_init": lora_init if spec["rank"] else "-", "history": summary["history"],
                                         "evals": summary["evals"], "train_seconds": summary["seconds"]})
                _save(out, result)
                del student
    print()
    print(format_table(result["rows"], COLUMNS))
    print(f"\nwrote {out}")


def markdown_tables(result: dict) -> str:
    """Conversion grid (one row per config and LoRA init, ranks as columns) and the uptraining runs."""
    rows, parts = result["rows"], []
    for b in sorted({r["B"] for r in rows if r["part"].startswith("convert")}):
        grid = {}
        for r in rows:
            if r["part"] == f"convert{b}":
                grid.setdefault((r["init"], r["strategy"]), {}).setdefault(r.get("lora_init", "svd"), {})[r["rank"]] = r
        ranks = sorted({k for v in grid.values() for by in v.values() for k in by})
        table = []
        for (init, strategy), by_init in grid.items():
            shared = {k: r for by in by_init.values() for k, r in by.items() if k == 0}  # rank 0: no LoRA
            for lora_init in [li for li in ("svd", "asvd") if li in by_init] or ["-"]:
                by_rank = {**shared, **by_init.get(lora_init, {})}
                row = {"init": init, "strategy": strategy, "lora_init": lora_init}
                for k in ranks:
                    row[f"ppl r={k}"] = by_rank[k]["ppl"] if k in by_rank else None
                table.append(row)
        parts.append(f"B={b}, perplexity right after conversion\n\n" + format_table(table, markdown=True))
        flat = [r for v in grid.values() for by in v.values() for r in by.values()]
        sizes = [{"rank": k, **{c: next(r[c] for r in flat if r["rank"] == k)
                               for c in ("non_emb_params", "non_emb_reduction", "lora_params")}} for k in ranks]
        parts.append(f"B={b}, parameters (same for every init and strategy)\n\n" + format_table(sizes, markdown=True))
    up = [{**r, "lora_init": r.get("lora_init", "svd" if r["rank"] else "-")} for r in rows
          if r["part"] in ("uptrain", "aim")]
    if up:
        cols = ["init", "strategy", "lora_init", "rank", "step", "ppl", "ppl_ratio", "non_emb_params", "non_emb_reduction"]
        parts.append("B=2, perplexity during uptraining\n\n" + format_table(up, cols, markdown=True))
    for c in result.get("curves", []):
        h = c["history"]
        pts = sorted({0, len(h) // 4, len(h) // 2, 3 * len(h) // 4, len(h) - 1})
        li = c.get("lora_init", "svd" if c["rank"] else "-")
        parts.append(f"training loss, {c['init']} {c['strategy']} rank {c['rank']} ({li}): "
                     + ", ".join(f"step {h[i]['step']}: {h[i]['loss']:.3f}" for i in pts))
    return "\n\n".join(parts)


def _rank_label(rank) -> int | str:
    """An int rank as is; a per-target dict as e.g. ``q32 k16 v16 o32 gate64 up64 down64``."""
    return " ".join(f"{k}{v}" for k, v in rank.items()) if isinstance(rank, dict) else rank


def _save(path: Path, result: dict) -> None:
    path.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
