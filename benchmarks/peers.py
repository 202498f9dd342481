"""effml vs llm-compressor (and AutoRound) on SmolLM2-135M, same calibration windows, same evaluation.

    OMP_NUM_THREADS=1 python benchmarks/peers.py                 # all rows
    OMP_NUM_THREADS=1 python benchmarks/peers.py --rows llmc-gptq-w4a16,effml-gptq-w4a16

Protocol (issue 14):

1. This process (effml's environment) loads ``effml.load_model("smollm2-135m")``, makes the
   calibration windows ``effml.calibration_data(tok, n_samples=16, seq_len=512, seed=0)``, writes
   them as token ids to ``calib.safetensors`` and the FP model as an HF checkpoint
   (``save_pretrained`` + tokenizer) in a temporary folder.
2. Each peer row runs in the virtualenv of ``benchmarks/peers_env.sh`` (llm-compressor pins a
   transformers / compressed-tensors that clash with effml's) via a subprocess: the worker below
   (``PEER_WORKER``) loads that checkpoint and those exact token windows, runs the recipe
   (``oneshot``, sequential pipeline), and writes the whole state dict with every quantized
   linear's weight fake-quantized (dequantized on its grid, float32) to safetensors, plus the
   first tokens of its calibration batch and its calibration time.
3. This process loads those weights into a fresh copy of the FP model (strict: every key) and
   evaluates ``effml.perplexity(model, tok, seq_len=1024, max_windows=16)``. W8A8: effml's own
   per-token dynamic symmetric int8 activation quantizer (absmax/127) is put on every decoder
   linear (``wrap_linears`` + ``set_activation_quant``, weights left as the peer's float values);
   llm-compressor's own W8A8 scheme is the same per-token dynamic int8 but with absmax/127.5.
4. effml rows run here on the same windows and model copy.

Results go to benchmarks/results/peers.json after every row (a rerun skips rows already there).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import effml
from effml.core.table import format_table

REPO = Path(__file__).resolve().parent.parent
N_SAMPLES, CALIB_LEN, EVAL_LEN, WINDOWS = 16, 512, 1024, 16

# row -> (peer recipe name or None for effml, effml quantize kwargs / None)
ROWS = {
    "llmc-gptq-w4a16": ("gptq_w4a16", None),
    "llmc-gptq-w4a16-g64": ("gptq_w4a16_g64", None),
    "effml-gptq-w4a16": (None, {"method": "gptq", "w_bits": 4}),
    "effml-gptq-w4a16-g64": (None, {"method": "gptq", "w_bits": 4, "group_size": 64}),
    "llmc-sq-gptq-w8a8": ("sq_gptq_w8a8", None),
    "autoround-w4a16": ("autoround_w4a16", None),
}

PEER_WORKER = r'''
import json, sys, time
import torch
from safetensors.torch import load_file, save_file

model_dir, calib_path, out_dir, recipe_name = sys.argv[1:5]
extra = json.loads(sys.argv[5]) if len(sys.argv) > 5 else {}
torch.manual_seed(0)
from transformers import AutoModelForCausalLM, AutoTokenizer
import transformers

ids = load_file(calib_path)["input_ids"].long()
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
tok = AutoTokenizer.from_pretrained(model_dir)
info = {"torch": torch.__version__, "transformers": transformers.__version__,
        "first_tokens": ids[:, :8].tolist(), "calib_shape": list(ids.shape)}

if recipe_name.startswith("autoround"):
    import auto_round
    from auto_round import AutoRound
    info["auto_round"] = auto_round.__version__
    texts = [ids[i].tolist() for i in range(ids.shape[0])]
    iters = int(extra.get("iters", 200))
    start = time.perf_counter()
    ar = AutoRound(model, tok, bits=4, group_size=-1, sym=True, dataset=texts, nsamples=ids.shape[0],
                   seqlen=ids.shape[1], iters=iters, device_map="cpu", batch_size=8)
    ar.quantize()
    info["calib_s"] = time.perf_counter() - start
    info["iters"] = iters
    state = {k: v.detach().float().contiguous() for k, v in model.state_dict().items()}
else:
    import compressed_tensors, llmcompressor
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    info["llmcompressor"] = llmcompressor.__version__
    info["compressed_tensors"] = compressed_tensors.__version__

    def w4(strategy, group_size=None):
        args = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy=strategy,
                                group_size=group_size, actorder="static")
        return {"group_0": QuantizationScheme(targets=["Linear"], weights=args)}

    if recipe_name == "gptq_w4a16":
        recipe = [GPTQModifier(config_groups=w4("channel"), ignore=["lm_head"], block_size=128,
                               dampening_frac=0.01)]
    elif recipe_name == "gptq_w4a16_g64":
        recipe = [GPTQModifier(config_groups=w4("group", 64), ignore=["lm_head"], block_size=128,
                               dampening_frac=0.01)]
    elif recipe_name == "sq_gptq_w8a8":
        try:
            from llmcompressor.modifiers.transform.smoothquant import SmoothQuantModifier
        except ImportError:
            from llmcompressor.modifiers.smoothquant import SmoothQuantModifier
        recipe = [SmoothQuantModifier(smoothing_strength=0.8),
                  GPTQModifier(targets="Linear", scheme="W8A8", ignore=["lm_head"], block_size=128,
                               dampening_frac=0.01)]
    else:
        raise SystemExit(f"unknown recipe {recipe_name}")
    ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    start = time.perf_counter()
    oneshot(model=model, dataset=ds, recipe=recipe, max_seq_length=ids.shape[1],
            num_calibration_samples=ids.shape[0], pipeline="sequential", shuffle_calibration_samples=False)
    info["calib_s"] = time.perf_counter() - start
    info["recipe"] = [str(r) for r in recipe]
    # fake-quantize each quantized linear's weight with its stored qparams (idempotent when
    # GPTQ already left the weight on its grid, which it does)
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    state = {}
    n_q = 0
    max_change = 0.0
    for name, mod in model.named_modules():
        scheme = getattr(mod, "quantization_scheme", None)
        if scheme is not None and scheme.weights is not None and hasattr(mod, "weight_scale"):
            w = mod.weight.detach().float()
            zp = getattr(mod, "weight_zero_point", None)
            try:  # static / no act-order: no g_idx, scales in the original column order
                fq = fake_quantize(w, mod.weight_scale.float(), zp, scheme.weights).float()
                max_change = max(max_change, float((fq - w).abs().max()))
            except Exception as e:  # GPTQ already left the weight on its grid: keep it
                info.setdefault("refakequant_errors", []).append(f"{name}: {e!r}"[:300])
                fq = w
            state[name + ".weight"] = fq
            n_q += 1
    info["n_quantized_linears"] = n_q
    info["max_refakequant_change"] = max_change
    for k, v in model.state_dict().items():
        if k.endswith((".weight", ".bias")) and k not in state and "weight_" not in k.rsplit(".", 1)[-1]:
            state[k] = v.detach().float()
    state = {k: v.contiguous() for k, v in state.items()}
# tied embeddings / lm_head share memory, which safetensors refuses: store the head once
if "lm_head.weight" in state and "model.embed_tokens.weight" in state and \
        state["lm_head.weight"].data_ptr() == state["model.embed_tokens.weight"].data_ptr():
    del state["lm_head.weight"]
state = {k: v.clone() for k, v in state.items()}
save_file(state, out_dir + "/weights.safetensors")
with open(out_dir + "/info.json", "w") as f:
    json.dump(info, f)
'''


def peer_python() -> str:
    env_py = os.environ.get("EFFML_PEERS_PYTHON")
    if env_py:
        return env_py
    out = subprocess.run(["bash", str(REPO / "benchmarks/peers_env.sh")], check=True, capture_output=True, text=True)
    return out.stdout.strip().splitlines()[-1]


def run_peer(py: str, recipe: str, model_dir: Path, calib_path: Path, work: Path, extra: dict) -> tuple[dict, dict]:
    out = work / recipe
    out.mkdir(exist_ok=True)
    script = work / "peer_worker.py"
    script.write_text(PEER_WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "PYTHONNOUSERSITE": "1"}
    env.pop("PYTHONPATH", None)
    start = time.perf_counter()
    proc = subprocess.run([py, str(script), str(model_dir), str(calib_path), str(out), recipe, json.dumps(extra)],
                          env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    (out / "log.txt").write_text(proc.stdout + "\n" + proc.stderr)
    if proc.returncode:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-15:]
        raise RuntimeError(f"peer {recipe} failed (rc {proc.returncode}):\n" + "\n".join(tail))
    info = json.loads((out / "info.json").read_text())
    info["subprocess_wall_s"] = round(wall, 1)
    return info, load_file(str(out / "weights.safetensors"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, from {list(ROWS)}")
    p.add_argument("--windows", type=int, default=WINDOWS)
    p.add_argument("--autoround-iters", type=int, default=200)
    p.add_argument("--out", default="benchmarks/results/peers.json")
    args = p.parse_args(argv)
    rows = args.rows.split(",")
    for r in rows:
        if r not in ROWS:
            raise SystemExit(f"unknown row {r!r}; choose from {list(ROWS)}")

    base, tok = effml.load_model("smollm2-135m")
    calib = effml.calibration_data(tok, n_samples=N_SAMPLES, seq_len=CALIB_LEN, seed=0)
    out = Path(args.out)
    prev = json.loads(out.read_text()) if out.exists() else {}
    results = [r for r in prev.get("rows", []) if prev.get("windows") == args.windows and r.get("status") != "failed"]
    meta = {"model": "smollm2-135m", "windows": args.windows, "eval_seq_len": EVAL_LEN,
            "calibration": {"n_samples": N_SAMPLES, "seq_len": CALIB_LEN, "seed": 0,
                            "first_tokens": calib[:, :8].tolist()},
            "command": "OMP_NUM_THREADS=1 python " + " ".join(sys.argv), "rows": results}
    if not any(r["row"] == "fp32" for r in results):
        results.append({"row": "fp32", "ppl": round(effml.perplexity(base, tok, seq_len=EVAL_LEN,
                                                                      max_windows=args.windows), 3)})
    py = None
    with tempfile.TemporaryDirectory(prefix="effml-peers-") as tmp:
        work = Path(tmp)
        model_dir, calib_path = work / "fp-hf", work / "calib.safetensors"
        saved = False
        for name in rows:
            if any(r["row"] == name for r in results):
                continue
            recipe, kw = ROWS[name]
            row = {"row": name}
            model = copy.deepcopy(base)
            if recipe is None:
                kw = dict(kw)
                method = kw.pop("method")
                start = time.perf_counter()
                effml.quantize(model, method, calib=calib, n_samples=N_SAMPLES, seq_len=CALIB_LEN, **kw)
                row.update(side="effml", calib_s=round(time.perf_counter() - start, 1),
                           config={k: v for k, v in model.effml_report["config"].items()
                                   if k in ("w_bits", "group_size", "act_order", "damp", "block_size", "w_mse",
                                            "w_sym_grid")})
            else:
                if py is None:
                    py = peer_python()
                if not saved:
                    base.save_pretrained(model_dir, safe_serialization=True)
                    tok.save_pretrained(model_dir)
                    save_file({"input_ids": calib.to(torch.int64).contiguous()}, str(calib_path))
                    saved = True
                extra = {"iters": args.autoround_iters} if recipe.startswith("autoround") else {}
                try:
                    info, state = run_peer(py, recipe, model_dir, calib_path, work, extra)
                except RuntimeError as e:
                    row.update(side="peer", status="failed", error=str(e)[-3000:])
                    print(row["error"], flush=True)
                    results.append(row)
                    out.write_text(json.dumps(meta, indent=2))
                    del model
                    continue
                same = info["first_tokens"] == calib[:, :8].tolist() and info["calib_shape"] == list(calib.shape)
                missing, unexpected = model.load_state_dict(state, strict=False)
                missing = [k for k in missing if not k.endswith("lm_head.weight")]  # tied to the embeddings
                if missing or unexpected:
                    raise RuntimeError(f"{name}: state dict mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
                row.update(side="peer", calib_s=round(info["calib_s"], 1), same_calib_tokens=same,
                           peer_info={k: v for k, v in info.items() if k != "first_tokens"})
                if recipe == "sq_gptq_w8a8":
                    from effml.quant.apply import set_activation_quant, wrap_linears
                    from effml.quant.config import QuantConfig

                    wrap_linears(model)  # float weights stay the peer's; only activations quantized
                    set_activation_quant(model, QuantConfig(w_bits=16, a_bits=8))
                    row["act_quant"] = "effml per-token dynamic int8 symmetric (absmax/127) on peer weights"
            ppl = effml.perplexity(model, tok, seq_len=EVAL_LEN, max_windows=args.windows)
            row["ppl"] = round(ppl, 3)
            results.append(row)
            print(format_table([{k: row.get(k) for k in ("row", "side", "ppl", "calib_s", "same_calib_tokens")}]),
                  flush=True)
            out.write_text(json.dumps(meta, indent=2))
            del model
    out.write_text(json.dumps(meta, indent=2))
    print(format_table([{k: r.get(k) for k in ("row", "side", "ppl", "calib_s", "same_calib_tokens", "status")}
                        for r in results]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
