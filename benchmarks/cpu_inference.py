"""CPU inference of compressed SmolLM2-135M: resident memory, decode and prefill speed, and the
memory-bandwidth limit, for every system in one run, at 1 and 2 threads.

    python benchmarks/cpu_inference.py                       # the full run (see --help)
    python benchmarks/cpu_inference.py --markdown            # the tables of an existing JSON

Systems: HF float32 and bfloat16; effml W4A16 (RTN, group 32 / 64 / per channel; group 64 with
an 8-bit or 4-bit LM head; group 64 on a bfloat16 model), W8A8 (RTN, per channel, per-token
activations), FlatQuant W4A4KV4 (no training: its Hadamard-initialised transforms, ``epochs=0``,
a small calibration set; the timing is the point), W4A16 g64 after 50% magnitude pruning (stored
and run dense), recursive B=2 (average init, rank-16 SVD LoRA, float32), and torchao's CPU int4
weight-only (``PrototypeInt4WeightOnlyConfig``, group 64, on the bfloat16 model: the peer).

Per system and thread count: decode tokens/s at batch 1 and 8 (greedy, HF cache: one prefill
of a ``--prompt``-token prompt, then ``--new`` timed decode steps), prefill tokens/s (one ``--prefill``-token forward). Memory bandwidth is
measured with a large tensor copy in the same run; bytes read per decoded token (weights as the
kernels read them, plus the KV cache at the mean context) give each system's best possible
batch-1 decode rate and its share of it. Perplexity (WikiText-2, ``--ppl-windows`` windows of
1024) compares each effml system's default CPU path with its torch reference path.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import logging
import time
from pathlib import Path

import torch
import torch.nn as nn
from effml.kernels import dispatch, use_kernels

import effml
from effml.core.table import format_table

OUT = Path(__file__).parent / "results" / "cpu_inference.json"
SYSTEMS = ("hf_fp32", "hf_bf16", "w4a16_g32", "w4a16_g64", "w4a16_channel", "w4a16_g64_head8", "w4a16_g64_head4",
           "w4a16_g64_bf16model", "w8a8", "flatquant_w4a4kv4", "w4a16_g64_pruned50", "torchao_int4_g64", "recursive_b2")
EFFML = {s for s in SYSTEMS if not s.startswith(("hf_", "torchao", "recursive"))}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=SYSTEMS)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--more-threads-only", nargs="+", default=None, choices=SYSTEMS,
                   help="run thread counts after the first only for these systems (a shorter run)")
    p.add_argument("--prompt", type=int, default=256, help="decode prompt length")
    p.add_argument("--new", type=int, default=128, help="decoded tokens per sequence")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--prefill", type=int, default=1024, help="prefill length (batch 1)")
    p.add_argument("--ppl-windows", type=int, default=16, help="perplexity windows (0: skip)")
    p.add_argument("--ppl-systems", nargs="+", default=None, choices=SYSTEMS, help="perplexity only for these")
    p.add_argument("--calib", type=int, default=8, help="FlatQuant calibration windows of 256 tokens")
    p.add_argument("--out", default=str(OUT))
    p.add_argument("--markdown", action="store_true", help="only print the tables of an existing --out JSON")
    return p.parse_args(argv)


# --- measurements ---------------------------------------------------------------------------------
def bandwidth_gbs(threads: int, mb: int = 512, reps: int = 5) -> float:
    """Read + write bytes per second of one large copy (best of ``reps``)."""
    torch.set_num_threads(threads)
    src = torch.ones(mb * 2**20 // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t)
    return 2 * src.numel() * 4 / best / 1e9


def _tensor_bytes(t: torch.Tensor, seen: set) -> int:
    if hasattr(t, "__tensor_flatten__") and type(t) is not torch.Tensor and not isinstance(t, nn.Parameter):
        names, _ = t.__tensor_flatten__()
        return sum(_tensor_bytes(getattr(t, n), seen) for n in names)
    if isinstance(t, nn.Parameter) and type(t.data) is not torch.Tensor:
        return _tensor_bytes(t.data, seen)
    key = t.untyped_storage().data_ptr()
    if key in seen:
        return 0
    seen.add(key)
    return t.untyped_storage().nbytes()


def resident_bytes(model: nn.Module) -> int:
    """Parameters, buffers (each storage once, tensor subclasses by their parts), the CPU
    kernels' packed weights and any dense float copy."""
    seen: set = set()
    total = sum(_tensor_bytes(t, seen) for t in list(model.parameters()) + list(model.buffers()))
    for m in model.modules():
        extra = [m.__dict__.get("_deq")] + list((m.__dict__.get("_kernel_cache") or {}).values())
        total += sum(_tensor_bytes(t, seen) for t in extra if isinstance(t, torch.Tensor))
    return total


def quantized_linear_bytes(model: nn.Module) -> tuple[int, int]:
    """(resident bytes of the QuantLinears with integer weights, their float32 bytes)."""
    from effml.quant.qlinear import QuantLinear

    res = fp32 = 0
    for m in model.modules():
        if isinstance(m, QuantLinear) and m.weight is None:
            res += dispatch.resident_bytes(m)
            fp32 += 4 * m.in_features * m.out_features
    return res, fp32


def read_bytes_per_token(model: nn.Module, context: int) -> int:
    """Bytes one batch-1 decode step reads: every linear's weight as its kernel reads it (shared
    weights once per use: recursive loops re-read them), norms, and the KV cache."""
    from effml.quant.qlinear import QuantLinear

    total = 0
    for _, m in model.named_modules(remove_duplicate=False):
        if isinstance(m, QuantLinear):
            cache = m.__dict__.get("_kernel_cache")
            if m.weight is not None:
                total += m.weight.numel() * m.weight.element_size()
            elif cache and cache["path"].startswith("cpu_"):
                total += sum(v.numel() * v.element_size() for v in cache.values() if isinstance(v, torch.Tensor))
            else:
                total += m.effml_storage()[1]
        elif isinstance(m, nn.Linear) or type(m).__name__.endswith("RMSNorm"):
            total += sum(_tensor_bytes(p, set()) for p in m.parameters(recurse=False))
    cfg = model.config
    heads = getattr(cfg, "num_key_value_heads", cfg.num_attention_heads)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    act_bytes = 2 if next(model.parameters()).dtype == torch.bfloat16 else 4
    total += cfg.num_hidden_layers * 2 * heads * head_dim * act_bytes * context
    return total


@torch.no_grad()
def decode_rate(model, batch: int, prompt: int, new: int, vocab: int) -> float:
    """Greedy decode with the HF cache: one prefill of the prompt, then ``new`` timed steps."""
    g = torch.Generator().manual_seed(batch)
    ids = torch.randint(3, vocab, (batch, prompt), generator=g)
    model(ids[:, :8], use_cache=True)  # warm-up (and the kernels' first packing, if not done yet)
    out = model(ids, use_cache=True)
    cache, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
    t = time.perf_counter()
    for _ in range(new):
        out = model(nxt, past_key_values=cache, use_cache=True)
        cache, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
    return batch * new / (time.perf_counter() - t)


@torch.no_grad()
def prefill_rate(model, n: int, vocab: int) -> float:
    ids = torch.randint(3, vocab, (1, n), generator=torch.Generator().manual_seed(0))
    model(ids[:, :64], use_cache=False)
    t = time.perf_counter()
    model(ids, use_cache=False)
    return n / (time.perf_counter() - t)


# --- systems --------------------------------------------------------------------------------------
def build(name: str, base: nn.Module, base_bf16: nn.Module, tok, args) -> tuple[nn.Module, str]:
    """A fresh copy of the model compressed as ``name``, and what was done."""
    if name == "hf_fp32":
        return base, "HF float32"
    if name == "hf_bf16":
        return base_bf16, "HF bfloat16"
    if name == "torchao_int4_g64":
        from torchao.prototype.quantization.int4.inference_workflow import PrototypeInt4WeightOnlyConfig
        from torchao.quantization import quantize_

        m = copy.deepcopy(base_bf16)
        quantize_(m, PrototypeInt4WeightOnlyConfig(group_size=64))
        return m, "torchao 0.x Int4OpaqueTensor (aten._weight_int4pack_mm_for_cpu), g64, bf16 model, decoder linears"
    if name == "recursive_b2":
        m = effml.recursify(copy.deepcopy(base), num_loops=2, init="average", lora_rank=16)
        return m, "recursify(num_loops=2, init=average, lora_rank=16), float32, no uptraining"
    if name == "w4a16_g64_bf16model":
        m = effml.quantize(copy.deepcopy(base_bf16), "rtn", w_bits=4, group_size=64)
        return m, "RTN W4 g64 on the bfloat16 model"
    if name == "flatquant_w4a4kv4":
        calib = effml.calibration_data(tok, "wikitext2", n_samples=args.calib, seq_len=256)
        m = effml.quantize(copy.deepcopy(base), "flatquant", w_bits=4, a_bits=4, kv_bits=4, calib=calib, epochs=0,
                           n_samples=args.calib, seq_len=256)
        return m, f"FlatQuant W4A4KV4, epochs=0 (Hadamard init, no training), {args.calib}x256 calibration tokens"
    if name == "w4a16_g64_pruned50":
        m = effml.prune(copy.deepcopy(base), sparsity=0.5, method="magnitude", allocation="uniform")
        m = effml.quantize(m, "rtn", w_bits=4, group_size=64)
        return m, "magnitude 50% (uniform), then RTN W4 g64; zeros stored and multiplied"
    cfgs = {"w4a16_g32": dict(w_bits=4, group_size=32), "w4a16_g64": dict(w_bits=4, group_size=64),
            "w4a16_channel": dict(w_bits=4), "w4a16_g64_head8": dict(w_bits=4, group_size=64, lm_head_bits=8),
            "w4a16_g64_head4": dict(w_bits=4, group_size=64, lm_head_bits=4), "w8a8": dict(w_bits=8, a_bits=8)}
    m = effml.quantize(copy.deepcopy(base), "rtn", **cfgs[name])
    return m, "RTN " + ", ".join(f"{k}={v}" for k, v in cfgs[name].items())


def perplexities(model, tok, windows: int) -> dict:
    with use_kernels("torch"):
        ref = effml.perplexity(model, tok, "wikitext2", seq_len=1024, max_windows=windows)
    dispatch.calls.clear()
    fast = effml.perplexity(model, tok, "wikitext2", seq_len=1024, max_windows=windows)
    out = {"ppl_torch": ref, "ppl_fast": fast, "ppl_rel_diff": abs(fast - ref) / ref, "paths": dict(dispatch.calls)}
    if any(getattr(m, "act_quant", None) is not None for m in model.modules()):
        # quantized activations make the reference itself chaotic: rounding codes flip under a
        # 1e-7 relative change of the input; this is the reference's own spread
        emb = model.get_input_embeddings()
        h = emb.register_forward_hook(lambda mod, inp, out: out * (1 + 1e-7))
        try:
            with use_kernels("torch"):
                p = effml.perplexity(model, tok, "wikitext2", seq_len=1024, max_windows=windows)
        finally:
            h.remove()
        out.update(ppl_torch_perturbed=p, ppl_torch_perturbed_rel_diff=abs(p - ref) / ref)
    if dispatch.calls["cpu_dequant"]:  # weight-only prefill ran dense: also measure the kernel itself
        rows, dispatch.PREFILL_ROWS = dispatch.PREFILL_ROWS, 1 << 30
        try:
            k = effml.perplexity(model, tok, "wikitext2", seq_len=1024, max_windows=windows)
        finally:
            dispatch.PREFILL_ROWS = rows
        out.update(ppl_kernel=k, ppl_kernel_rel_diff=abs(k - ref) / ref)
    return out


def run(args) -> dict:
    from effml.core.loading import load_model

    base, tok = load_model(args.model)
    base_bf16 = copy.deepcopy(base).to(torch.bfloat16)
    vocab = base.config.vocab_size
    context = args.prompt + args.new // 2
    result = {"model": args.model, "torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
              "config": {k: v for k, v in vars(args).items() if k not in ("markdown", "out")},
              "bandwidth_gbs": {}, "rows": []}
    for th in args.threads:
        result["bandwidth_gbs"][str(th)] = bandwidth_gbs(th)
    logging.info("bandwidth: %s GB/s", result["bandwidth_gbs"])
    kept: dict = {}
    for name in args.systems:
        t0 = time.perf_counter()
        model, what = build(name, base, base_bf16, tok, args)
        model.eval()
        build_s = time.perf_counter() - t0
        dispatch.prepare(model)
        row = {"system": name, "what": what, "build_s": round(build_s, 1), "resident_mb": resident_bytes(model) / 2**20,
               "read_mb_per_token": read_bytes_per_token(model, context) / 2**20}
        q_res, q_fp32 = quantized_linear_bytes(model)
        if q_fp32:
            row["quant_linear_resident_frac"] = q_res / q_fp32
        for th in args.threads:
            if th != args.threads[0] and args.more_threads_only and name not in args.more_threads_only:
                continue
            torch.set_num_threads(th)
            dispatch.calls.clear()
            r = {f"decode_b{b}_tok_s": decode_rate(model, b, args.prompt, args.new, vocab) for b in args.batches}
            r["prefill_tok_s"] = prefill_rate(model, args.prefill, vocab)
            limit = result["bandwidth_gbs"][str(th)] * 1e9 / (row["read_mb_per_token"] * 2**20)
            r.update(limit_b1_tok_s=limit, share_of_limit_b1=r.get("decode_b1_tok_s", 0.0) / limit,
                     paths=dict(dispatch.calls))
            row[f"threads_{th}"] = r
            logging.info("%s @%d threads: %s", name, th, {k: round(v, 2) for k, v in r.items() if k != "paths"})
        result["rows"].append(row)
        if name in EFFML and args.ppl_windows and (args.ppl_systems is None or name in args.ppl_systems):
            kept[name] = (model, row)  # perplexity after every timing (a partial run keeps the timings)
        result["targets"] = targets(result)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
        del model
        gc.collect()
    torch.set_num_threads(max(args.threads))
    for name, (model, row) in kept.items():
        row.update(perplexities(model, tok, args.ppl_windows))
        logging.info("%s perplexity: %s", name, {k: v for k, v in row.items() if k.startswith("ppl")})
        Path(args.out).write_text(json.dumps(result, indent=2))
    return result


def targets(result: dict) -> dict:
    rows = {r["system"]: r for r in result["rows"]}
    out = {}
    for th in result["config"]["threads"]:
        k = f"threads_{th}"
        get = lambda s, m, k=k: rows.get(s, {}).get(k, {}).get(m)  # noqa: E731
        fp32, ao = get("hf_fp32", "decode_b1_tok_s"), get("torchao_int4_g64", "decode_b1_tok_s")
        for s in ("w4a16_g32", "w4a16_g64", "w4a16_channel", "w4a16_g64_head4", "w4a16_g64_bf16model"):
            v = get(s, "decode_b1_tok_s")
            if v and fp32:
                out[f"{s}_decode_vs_fp32@{th}"] = round(v / fp32, 2)
            if v and ao:
                out[f"{s}_decode_vs_torchao@{th}"] = round(v / ao, 2)
        a, b = get("w8a8", "prefill_tok_s"), get("hf_fp32", "prefill_tok_s")
        if a and b:
            out[f"w8a8_prefill_vs_fp32@{th}"] = round(a / b, 2)
    return out


def tables(result: dict, markdown: bool = False) -> str:
    rows = []
    for r in result["rows"]:
        for th in result["config"]["threads"]:
            t = r.get(f"threads_{th}")
            if t is None:
                continue
            rows.append({
                "system": r["system"], "threads": th, "resident MB": f"{r['resident_mb']:.0f}",
                "qlinear/fp32": f"{r['quant_linear_resident_frac']:.2f}" if "quant_linear_resident_frac" in r else "",
                "read MB/tok": f"{r['read_mb_per_token']:.1f}",
                **{f"decode b{b}": f"{t.get(f'decode_b{b}_tok_s', 0):.1f}" for b in result["config"]["batches"]},
                "prefill": f"{t.get('prefill_tok_s', 0):.0f}", "limit b1": f"{t.get('limit_b1_tok_s', 0):.0f}",
                "share": f"{t.get('share_of_limit_b1', 0):.2f}",
                "ppl fast/torch": f"{r['ppl_fast']:.3f}/{r['ppl_torch']:.3f}" if "ppl_fast" in r else "",
                "ppl kernel": f"{r['ppl_kernel']:.3f}" if "ppl_kernel" in r else "",
                "ppl torch+1e-7": f"{r['ppl_torch_perturbed']:.3f}" if "ppl_torch_perturbed" in r else "",
            })
    bw = ", ".join(f"{k} thread(s): {v:.1f} GB/s" for k, v in result["bandwidth_gbs"].items())
    return (f"{format_table(rows, markdown=markdown)}\n\nmemory bandwidth (copy): {bw}\n"
            f"targets: {json.dumps(result.get('targets', {}))}")


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.markdown:
        print(tables(json.loads(Path(args.out).read_text()), markdown=True))
        return
    result = run(args)
    print(tables(result))


if __name__ == "__main__":
    main()
