"""Methods composed on SmolLM2-135M: prune or recursify, then GPTQ W4A16, against each method alone.

    python benchmarks/compose.py                     # all rows, 16 windows of 1024 tokens
    python benchmarks/compose.py --max-windows 2     # a quick look

Rows, composed ones first (each single-method model is the very one the composed row quantized):
  wanda-alpha-50+gptq-w4a16, sparsegpt-2:4+gptq-w4a16, recursify-b2-asvd-r64+gptq-w4a16, then
  wanda-alpha-50, sparsegpt-2:4, recursify-b2-asvd-r64, gptq-w4a16, fp.
Per row: perplexity (wikitext2 test), decoder-linear sparsity before and after quantization,
effml.model_size bytes and parameters, seconds. Results go to benchmarks/results/compose.json
after every row; a rerun with the same --out skips rows already there.
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
from effml.quant.api import linear_sparsity

GPTQ = {"method": "gptq", "w_bits": 4}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-windows", type=int, default=16)
    ap.add_argument("--n-samples", type=int, default=16)
    ap.add_argument("--calib-len", type=int, default=512)
    ap.add_argument("--out", default="benchmarks/results/compose.json")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)
    out = Path(args.out)
    rows = json.loads(out.read_text()) if out.exists() else {}
    model, tok = effml.load_model("smollm2-135m")
    calib = effml.calibration_data(tok, "wikitext2", n_samples=args.n_samples, seq_len=args.calib_len)

    def record(name: str, m, seconds: float, before: float | None = None) -> None:
        start = time.perf_counter()
        ppl = effml.perplexity(m, tok, "wikitext2", seq_len=1024, max_windows=args.max_windows)
        size = effml.model_size(m)
        rows[name] = {
            "ppl": ppl, "sparsity_before_quant": before, "sparsity": linear_sparsity(m),
            "bytes": size["bytes"], "parameters": size["parameters"], "seconds": round(seconds, 1),
            "eval_seconds": round(time.perf_counter() - start, 1),
        }
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(rows, indent=2))
        print(f"{name}: {rows[name]}", flush=True)

    def timed(fn):
        start = time.perf_counter()
        m = fn()
        return m, time.perf_counter() - start

    firsts = {
        "wanda-alpha-50": lambda: effml.prune(copy.deepcopy(model), 0.5, method="wanda", allocation="alpha", calib=calib),
        "sparsegpt-2:4": lambda: effml.prune(copy.deepcopy(model), None, method="sparsegpt", allocation="uniform",
                                             pattern="2:4", calib=calib),
        "recursify-b2-asvd-r64": lambda: effml.recursify(copy.deepcopy(model), num_loops=2, init="average",
                                                         lora_init="asvd", lora_rank=64, calib=calib),
    }
    # composed rows first (the point of this benchmark), keeping each first step's model so its
    # single-method row, evaluated afterwards, is the very model the composed row quantized
    singles = {}
    for name, fn in firsts.items():
        composed = f"{name}+gptq-w4a16"
        if name in rows and composed in rows:
            continue
        first, s1 = timed(fn)
        before = linear_sparsity(first)
        if name not in rows:
            singles[name] = (copy.deepcopy(first), s1)
        if composed not in rows:
            start = time.perf_counter()
            effml.quantize(first, calib=calib, **GPTQ)
            record(composed, first, s1 + time.perf_counter() - start, before)
        del first
    for name, (m, s1) in singles.items():
        record(name, m, s1)
    singles.clear()
    if "gptq-w4a16" not in rows:
        m, s = timed(lambda: effml.quantize(copy.deepcopy(model), calib=calib, **GPTQ))
        record("gptq-w4a16", m, s)
    if "fp" not in rows:
        record("fp", model, 0.0)

    table = [{"row": k, "ppl": round(v["ppl"], 2), "sparsity_before_quant": v["sparsity_before_quant"],
              "sparsity": round(v["sparsity"], 4), "MB": round(v["bytes"] / 2**20, 1),
              "parameters": v["parameters"], "seconds": v["seconds"]} for k, v in rows.items()]
    print(format_table(table))


if __name__ == "__main__":
    main()
