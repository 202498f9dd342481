"""Export SmolLM2-135M (FP, W4A16, W8A8), serve each export in vLLM's CPU build, and check it
teacher-forced against effml's own fp32 model; record tokens/s and disk sizes.

  python benchmarks/deploy.py [--out DIR] [--json FILE]      (./run.sh integration)

vLLM runs in its own cached virtualenv (benchmarks/vllm_env.sh). Pass criteria, per position of
4 x 128 WikiText-2 test tokens: vLLM's top-1 agreement with effml's model of the same variant is
at most 1 point (W4A16; 5 for W8A8, whose activation rounding flips between bf16 and fp32 inputs)
below that of the unquantized bf16 model served the same way, and vLLM's mean NLL is within 0.5%
(W8A8: 1%) of effml's.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from effml.kernels import use_kernels

import effml
from effml.core.data import load_text

HERE = Path(__file__).resolve().parent
VARIANTS = {  # name -> (quantize kwargs or None, allowed top-1 drop in points, allowed NLL ratio)
    "FP": (None, None, None),
    "W4A16": (dict(method="rtn", w_bits=4, group_size=64), 1.0, 0.005),
    "W8A8": (dict(method="smoothquant", w_bits=8, a_bits=8), 5.0, 0.01),
}


def folder_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.iterdir() if f.suffix == ".safetensors") / 2**20


@torch.no_grad()
def reference(model, rows: list[list[int]]) -> tuple[list[list[int]], list[list[float]]]:
    """effml's fp32 reference (torch path): per position, argmax and log-prob of the real next token."""
    top1, logprob = [], []
    with use_kernels("torch"):
        for row in rows:
            ids = torch.tensor([row])
            lp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
            top1.append(lp.argmax(-1).tolist())
            logprob.append(lp.gather(-1, ids[0, 1:, None])[:, 0].tolist())
    return top1, logprob


def compare(ref_top1, ref_lp, got) -> dict:
    n = agree = 0
    nll_ref = nll_got = 0.0
    for rt, rl, gt, gl in zip(ref_top1, ref_lp, got["top1"], got["logprob"]):
        agree += sum(a == b for a, b in zip(rt, gt))
        n += len(rt)
        nll_ref -= sum(rl)
        nll_got -= sum(gl)
    return {"top1_agreement": 100 * agree / n, "nll_effml": nll_ref / n, "nll_vllm": nll_got / n}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None, help="folder for the exports (default: a temporary one)")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    vpy = subprocess.run([str(HERE / "vllm_env.sh")], check=True, capture_output=True, text=True).stdout.strip()
    root = Path(args.out or tempfile.mkdtemp(prefix="effml-deploy-"))
    model0, tok = effml.load_model("smollm2-135m")
    ids = tok(load_text("wikitext2", "test")[:20000]).input_ids
    rows = [ids[i * 128:(i + 1) * 128] for i in range(4)]
    root.mkdir(parents=True, exist_ok=True)
    (root / "tokens.json").write_text(json.dumps({"ids": rows}))
    hf16 = root / "hf-fp16"
    model0.to(torch.float16).save_pretrained(hf16)
    model0.to(torch.float32)
    results = {}
    for name, (qkw, _, _) in VARIANTS.items():
        model, _ = effml.load_model("smollm2-135m")
        if qkw is not None:
            calib = effml.calibration_data(tok, "wikitext2", n_samples=16, seq_len=256) if qkw["method"] != "rtn" else None
            effml.quantize(model, calib=calib, **qkw)
            effml.save(model, root / f"effml-{name}", tok)
        ref_top1, ref_lp = reference(model, rows)
        out = effml.export(model, root / name, tok, dtype=torch.bfloat16, overwrite=True)
        res_file = root / f"{name}-vllm.json"
        subprocess.run([vpy, "-P", str(HERE / "vllm_run.py"), str(out), str(root / "tokens.json"), str(res_file)], check=True)
        got = json.loads(res_file.read_text())
        r = compare(ref_top1, ref_lp, got)
        r.update(tokens_per_s=round(got["tokens_per_s"], 1), startup_s=round(got["startup_s"], 1),
                 export_mb=round(folder_mb(out), 1),
                 effml_mb=round(folder_mb(root / f"effml-{name}"), 1) if qkw else None,
                 hf_fp16_mb=round(folder_mb(hf16), 1))
        results[name] = r
        del model
    fp = results["FP"]["top1_agreement"]
    ok = True
    for name, (_, drop, nll_tol) in VARIANTS.items():
        r = results[name]
        ratio = r["nll_vllm"] / r["nll_effml"] - 1
        r["nll_rel_diff"] = round(ratio, 5)
        if drop is not None:
            r["pass"] = r["top1_agreement"] >= fp - drop and abs(ratio) <= nll_tol
            ok &= r["pass"]
        print(f"{name:6s} top1 {r['top1_agreement']:.2f}%  NLL effml {r['nll_effml']:.4f} vLLM {r['nll_vllm']:.4f} "
              f"({100 * ratio:+.2f}%)  {r['tokens_per_s']} tok/s  export {r['export_mb']} MB  "
              f"effml {r['effml_mb']} MB  fp16 HF {r['hf_fp16_mb']} MB  {'PASS' if r.get('pass', True) else 'FAIL'}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
