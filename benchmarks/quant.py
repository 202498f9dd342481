"""Quantization benchmark on SmolLM2-135M: perplexity, calibration time and memory per method.

    OMP_NUM_THREADS=1 python benchmarks/quant.py --preset cpu
    python benchmarks/quant.py --preset gpu --device cuda

Rows are ``name:method:WxAyKVz[:gN]`` (e.g. ``quarot-gptq:quarot:w4a4kv4``); method options
of a row come from the preset (e.g. weight_quantizer=gptq for "-gptq" rows). Results are
written after every row, so a long run that is stopped keeps what it measured, and a rerun with
the same --out skips rows already there.

FlatQuant-RTN and FlatQuant-GPTQ rows of one setting share one transform calibration
(``quantize_weights=False`` then ``finish_weights``): the transforms do not depend on the later
weight quantizer. Their ``calib_s`` is the shared transform time plus their own weight step.
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import resource
import sys
import time
from pathlib import Path

import torch

import effml
from effml.core.table import format_table
from effml.quant import finish_weights, quantize

SETTINGS = ("w4a16", "w4a8kv8", "w4a4kv4")
# (row name, method, extra config); "-gptq" uses GPTQ for the weights of a transform method
METHOD_ROWS = [
    ("rtn", "rtn", {}),
    ("gptq", "gptq", {}),
    ("smoothquant", "smoothquant", {}),
    ("quarot-rtn", "quarot", {"weight_quantizer": "rtn"}),
    ("quarot-gptq", "quarot", {"weight_quantizer": "gptq"}),
    ("flatquant-rtn", "flatquant", {"weight_quantizer": "rtn"}),
    ("flatquant-gptq", "flatquant", {"weight_quantizer": "gptq"}),
]
PRESETS = {
    # Required-line rows first: they decide the Required checks.
    "cpu": {"windows": 16, "calib": {"n_samples": 16, "seq_len": 512},
            # FlatQuant rows of one setting are adjacent so they share one transform calibration
            "rows": ["fp", "flatquant-rtn:w4a4kv4", "flatquant-gptq:w4a4kv4", "rtn:w4a4kv4", "gptq:w4a4kv4",
                     "smoothquant:w4a4kv4", "quarot-rtn:w4a4kv4", "quarot-gptq:w4a4kv4", "gptq:w4a16",
                     "flatquant-rtn:w4a16", "flatquant-gptq:w4a16", "flatquant-rtn:w4a4kv4:g64",
                     "flatquant-gptq:w4a4kv4:g64", "rtn:w4a16", "smoothquant:w4a16", "quarot-rtn:w4a16",
                     "quarot-gptq:w4a16", "smoothquant:w8a8", "rtn:w4a8kv8", "gptq:w4a8kv8", "smoothquant:w4a8kv8",
                     "quarot-rtn:w4a8kv8", "quarot-gptq:w4a8kv8", "flatquant-rtn:w4a8kv8", "flatquant-gptq:w4a8kv8"]},
    "gpu": {"windows": 16, "calib": {"n_samples": 128, "seq_len": 2048},
            "rows": ["fp"] + [f"{r[0]}:{s}" for s in SETTINGS for r in METHOD_ROWS]
            + ["smoothquant:w8a8", "flatquant-rtn:w4a4kv4:g64", "flatquant-gptq:w4a4kv4:g64"]},
}


def parse_row(row: str) -> tuple[str, str | None, dict]:
    """``name:setting[:gN]`` -> (label, method, quantize kwargs)."""
    if row == "fp":
        return "fp32", None, {}
    parts = row.split(":")
    names = {r[0]: r for r in METHOD_ROWS}
    if parts[0] not in names or len(parts) not in (2, 3):
        raise ValueError(f"bad row {row!r}: use fp or NAME:wXaY[kvZ][:gN] with NAME in {sorted(names)}")
    _, method, extra = names[parts[0]]
    m = re.fullmatch(r"w(\d+)a(\d+)(?:kv(\d+))?", parts[1])
    if not m:
        raise ValueError(f"bad setting {parts[1]!r} in {row!r}: use e.g. w4a4kv4 or w8a8")
    kw = {"w_bits": int(m[1]), "a_bits": int(m[2]), "kv_bits": int(m[3] or 16), **extra}
    if len(parts) == 3:
        kw["group_size"] = int(parts[2].removeprefix("g"))
    return row, method, kw


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--rows", default=None, help="comma-separated rows (default: the preset's)")
    p.add_argument("--max-windows", type=int, default=None, help="evaluation windows (default: the preset's)")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--n-samples", type=int, default=None, help="calibration windows (default: the preset's)")
    p.add_argument("--calib-len", type=int, default=None, help="calibration window length (default: the preset's)")
    p.add_argument("--method-preset", default=None, help="FlatQuant preset (cpu/paper; default: by --preset)")
    p.add_argument("--flat-epochs", type=int, default=None, help="override the FlatQuant preset's epochs")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="benchmarks/results/quant.json")
    p.add_argument("--markdown", nargs="+", default=None, metavar="JSON",
                   help="only print the Markdown tables of these result files (merged) and exit")
    args = p.parse_args(argv)
    if args.markdown:
        print(markdown_tables([json.loads(Path(f).read_text()) for f in args.markdown]))
        return 0
    preset = PRESETS[args.preset]
    rows = args.rows.split(",") if args.rows else preset["rows"]
    parsed = [parse_row(r) for r in rows]  # fail before the slow model load
    windows = args.max_windows or preset["windows"]
    calib_kw = dict(preset["calib"])
    if args.n_samples:
        calib_kw["n_samples"] = args.n_samples
    if args.calib_len:
        calib_kw["seq_len"] = args.calib_len

    base, tok = effml.load_model(args.model, device=args.device)
    calib = effml.calibration_data(tok, n_samples=calib_kw["n_samples"], seq_len=calib_kw["seq_len"], seed=0)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    previous = json.loads(out.read_text())["rows"] if out.exists() else []
    labels = [label for label, _, _ in parsed]  # "fp" is stored as "fp32"
    results = [r for r in previous if r["row"] in labels]
    fp_ppl = next((r["ppl"] for r in results if r["method"] == "fp32"), None)
    flat_cache: dict[str, tuple] = {}  # setting -> (model after the transform step, its seconds)
    for label, method, kw in parsed:
        if any(r["row"] == label for r in results):
            continue
        start = time.perf_counter()
        if method == "flatquant":
            setting = label.split(":", 1)[1]
            todo = [lab for lab, m, _ in parsed if m == "flatquant" and lab.split(":", 1)[1] == setting
                    and not any(r["row"] == lab for r in results)]
            if setting not in flat_cache:
                model = copy.deepcopy(base)
                extra = {k: v for k, v in kw.items() if k != "weight_quantizer"}
                extra["preset"] = args.method_preset or ("paper" if args.preset == "gpu" else "cpu")
                if args.flat_epochs is not None:
                    extra["epochs"] = args.flat_epochs
                quantize(model, method, calib=calib, device=args.device, quantize_weights=False,
                         **extra, **calib_kw)
                flat_cache[setting] = (model, time.perf_counter() - start)
            shared, transform_s = flat_cache[setting]
            model = copy.deepcopy(shared) if len(todo) > 1 else shared
            if len(todo) <= 1:
                del flat_cache[setting]
            start = time.perf_counter() - transform_s
            finish_weights(model, kw["weight_quantizer"], calib)
        else:
            model = copy.deepcopy(base)
            if method is not None:
                quantize(model, method, calib=calib, device=args.device, **kw, **calib_kw)
        calib_s = time.perf_counter() - start
        ppl = effml.perplexity(model, tok, seq_len=args.seq_len, max_windows=windows)
        fp_ppl = ppl if method is None else fp_ppl
        size = effml.model_size(model)
        row = {"row": label, "method": method or "fp32", "ppl": round(ppl, 3),
               "x_fp": round(ppl / fp_ppl, 3) if fp_ppl else None, "calib_s": round(calib_s, 1),
               "peak_rss_mb": round(peak_rss_mb()), "bits_per_weight": round(size["bits_per_weight"], 2),
               "linear_bits": getattr(model, "effml_report", {}).get("linear_bits_per_weight")}
        if torch.cuda.is_available():
            row["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20)
            torch.cuda.reset_peak_memory_stats()
        results.append(row)
        print(format_table([row]), flush=True)
        meta = {"preset": args.preset, "model": args.model, "windows": windows, "seq_len": args.seq_len,
                "calibration": calib_kw, "command": " ".join(sys.argv), "rows": results}
        out.write_text(json.dumps(meta, indent=2))
        del model
    print(format_table(results))
    return 0


def markdown_tables(runs: list[dict]) -> str:
    """A method x setting grid of perplexity (and ratio to FP32), then every row's details."""
    rows = [r for run in runs for r in run["rows"]]
    fp = next(r["ppl"] for r in rows if r["method"] == "fp32")
    settings = [s for s in ("w4a16", "w4a8kv8", "w4a4kv4", "w4a4kv4:g64", "w8a8")
                if any(r["row"].split(":", 1)[-1] == s for r in rows)]
    grid = []
    for name, _, _ in METHOD_ROWS:
        cells = {s: next((r for r in rows if r["row"] == f"{name}:{s}"), None) for s in settings}
        if any(cells.values()):
            grid.append({"method": name, **{s: f"{c['ppl']:.2f} ({c['ppl'] / fp:.2f}x)" if c else "-"
                                             for s, c in cells.items()}})
    detail = [{"row": r["row"], "ppl": r["ppl"], "x_fp": round(r["ppl"] / fp, 3), "calib_s": r["calib_s"],
               "peak_rss_mb": r["peak_rss_mb"], "linear_bits": r.get("linear_bits")} for r in rows]
    return (f"FP32: {fp:.3f}\n\n" + format_table(grid, markdown=True) + "\n\n"
            + format_table(detail, markdown=True))


if __name__ == "__main__":
    sys.exit(main())
