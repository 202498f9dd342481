"""GPTQ W4A16 ablation on SmolLM2-135M: effml's GPTQ with one change at a time (issue 14).

    OMP_NUM_THREADS=1 python benchmarks/gptq_ablation.py --windows 4
    OMP_NUM_THREADS=1 python benchmarks/gptq_ablation.py --rows baseline,grid_minmax15 --windows 16

Calibration: ``effml.calibration_data(tok, n_samples=16, seq_len=512, seed=0)`` (the windows
benchmarks/peers.py gives llm-compressor); evaluation: ``effml.perplexity(seq_len=1024,
max_windows=--windows)``. Results are written after every row; a rerun with the same --out skips
rows already there.

Row ``library_default`` is the library itself (``effml.quantize(model, "gptq", w_bits=4)``, whose
GPTQ grid is now minmax15); the other rows run the same block-by-block GPTQ as
``effml.quant.apply.quantize_weights_gptq`` (engine with propagate="compressed", Hessians from
``QuantLinear.prepare_input``) through :func:`run_gptq` below: ``baseline`` with the settings
effml had before issue 14 (``BASE``), the others with one setting changed:

* ``grid``: symmetric scale ``absmax/7`` (effml) or ``absmax/7.5`` ("minmax15": reference GPTQ
  code, llm-compressor / compressed-tensors);
* ``fp16_scales``: effml rounds scales to float16 (how QuantLinear stores them); False keeps
  float32 scales, so that row is evaluated fake-quantized (weights kept as float);
* ``act_order`` / ``mse``: as in QuantConfig;
* ``hessians``: "sequential" (effml: the block's linears in groups q/k/v, o, gate/up, down; each
  group's Hessian is taken after the earlier groups are quantized, one block pass per group) or
  "layer" (llm-compressor's sequential pipeline: one pass of the block with its original weights
  gives every linear's Hessian, then all are quantized and the block's output is recomputed with
  the quantized weights for the next block).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import effml
from effml.core.arch import get_arch
from effml.core.calibrate import LayerwiseEngine
from effml.core.hessian import Hessian
from effml.core.surgery import block_linears
from effml.core.table import format_table
from effml.quant.apply import wrap_linears
from effml.quant.gptq import gptq_quantize
from effml.quant.qlinear import QuantLinear

BASE = {"grid": "absmax7", "fp16_scales": True, "act_order": True, "mse": False, "hessians": "sequential",
        "group_size": None}
ROWS = {
    "baseline": {},  # the old defaults (absmax/7 grid) through run_gptq
    "library_default": {},  # the library path as it is now: effml.quantize(model, "gptq", w_bits=4)
    "grid_minmax15": {"grid": "minmax15"},
    "fp32_scales": {"fp16_scales": False},
    "act_order_off": {"act_order": False},
    "mse_on": {"mse": True},
    "hessians_layer": {"hessians": "layer"},
    "g64_baseline": {"group_size": 64},
}


def run_gptq(model, calib, opts: dict, bits: int = 4, block_size: int = 128, damp: float = 0.01) -> dict:
    """GPTQ every decoder linear of ``model`` (already wrapped) with the settings ``opts``."""
    arch = get_arch(model)
    fake = not opts["fp16_scales"]

    def quant(n, m, h):
        q, scale, zero, loss = gptq_quantize(
            m.dequantized_weight().detach(), h, bits, True, opts["group_size"], block_size, damp,
            opts["act_order"], opts["mse"], name=n, grid=opts["grid"], fp16_scales=opts["fp16_scales"],
        )
        if fake:  # float32 scales cannot be stored by QuantLinear (float16): keep the float weight
            m.set_quantized_weight(q, 16)
        else:
            m.set_quantized_weight(q, bits, True, opts["group_size"], scale=scale, zero=zero)
        return loss

    losses = []

    def callback(ctx):
        refs = block_linears(ctx.block, ctx.index, arch, model.config, prefix=f"{ctx.name}.")
        by_role = {r: ref for ref in refs for r in ref.roles}
        groups = arch.sequential if opts["hessians"] == "sequential" else [sum(arch.sequential, ())]
        block_loss = 0.0
        for group in groups:
            mods = {by_role[r].name: by_role[r].module for r in group
                    if r in by_role and isinstance(by_role[r].module, QuantLinear)}
            if not mods:
                continue
            hess = {n: Hessian(m.in_features, ctx.device) for n, m in mods.items()}

            def collect(name, module, inp, out, hess=hess):
                hess[name].add(module.prepare_input(inp).detach())

            with ctx.hooks(mods, collect):
                ctx.forward(keep=False)
            for n, m in mods.items():
                block_loss += quant(n, m, hess[n].h)
        losses.append(block_loss)
        return {"gptq_loss": block_loss}

    LayerwiseEngine(model, calib, device="cpu").run(callback, propagate="compressed", desc="gptq-ablation")
    return {"gptq_loss_total": sum(losses)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, from {list(ROWS)} or "
                   "NAME=key:value;key:value (e.g. best=grid:minmax15;hessians:layer)")
    p.add_argument("--windows", type=int, default=16, help="evaluation windows of 1024 tokens")
    p.add_argument("--out", default="benchmarks/results/gptq_ablation.json")
    args = p.parse_args(argv)

    rows = {}
    for r in args.rows.split(","):
        if "=" in r:  # a combination given on the command line
            name, spec = r.split("=", 1)
            kv = dict(item.split(":", 1) for item in spec.split(";"))
            conv = {"True": True, "False": False, "None": None}
            rows[name] = {k: conv.get(v, int(v) if v.isdigit() else v) for k, v in kv.items()}
        else:
            rows[r] = ROWS[r]
    base, tok = effml.load_model("smollm2-135m")
    calib = effml.calibration_data(tok, n_samples=16, seq_len=512, seed=0)
    out = Path(args.out)
    prev = json.loads(out.read_text()) if out.exists() else {}
    results = [r for r in prev.get("rows", []) if prev.get("windows") == args.windows]
    if not any(r["row"] == "fp32" for r in results):
        ppl = effml.perplexity(base, tok, seq_len=1024, max_windows=args.windows)
        results.append({"row": "fp32", "ppl": round(ppl, 3), "calib_s": 0.0})
    for name, change in rows.items():
        if any(r["row"] == name for r in results):
            continue
        opts = {**BASE, **change}
        model = copy.deepcopy(base)
        start = time.perf_counter()
        if name == "library_default":
            effml.quantize(model, "gptq", w_bits=4, calib=calib, n_samples=16, seq_len=512)
            extra = {}
        else:
            wrap_linears(model)
            extra = run_gptq(model, calib, opts)
        calib_s = time.perf_counter() - start
        ppl = effml.perplexity(model, tok, seq_len=1024, max_windows=args.windows)
        row = {"row": name, "change": change, "ppl": round(ppl, 3), "calib_s": round(calib_s, 1), **extra}
        results.append(row)
        print(format_table([{k: v for k, v in row.items() if k != "change"}]), flush=True)
        meta = {"model": "smollm2-135m", "eval": {"seq_len": 1024, "windows": args.windows},
                "calibration": {"n_samples": 16, "seq_len": 512, "seed": 0}, "w_bits": 4, "base": BASE,
                "command": "OMP_NUM_THREADS=1 python " + " ".join(sys.argv), "rows": results}
        out.write_text(json.dumps(meta, indent=2))
        del model
    print(format_table([{k: (str(v) if k == "change" else v) for k, v in r.items()} for r in results]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
