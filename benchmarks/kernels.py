"""W4A4 / W4A16 Triton kernels vs torch bf16: per-GEMM times at LLaMA-2-7B and LLaMA-3-8B layer
shapes (transform + quantization included) and one whole decoder layer at prefill and decode.

    python benchmarks/kernels.py                       # GPU: the full preset, bf16
    OMP_NUM_THREADS=1 python benchmarks/kernels.py --tiny --compile-check   # CPU, interpreted

``--tiny`` (alias ``--interpret``) sets TRITON_INTERPRET=1 and runs SmolLM2-sized shapes on CPU
in float32: it shows the script and the kernels run, its times are interpreter times and say
nothing about GPU speed. ``--compile-check`` also compiles every kernel variant for sm_80 and
sm_90 (no GPU needed, in a subprocess without the interpreter) and records the MMA instructions.

Targets (issue 6): decoder layer prefill >= 1.8x bf16; decode with M <= 16 tokens >= 2.5x.
Every row also records the kernel output's error against the torch reference path.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

PRESETS = {
    "gpu": {
        "models": {
            # hidden, intermediate, heads, kv heads
            "llama-2-7b": (4096, 11008, 32, 32),
            "llama-3-8b": (4096, 14336, 32, 8),
        },
        "gemm_m": (1, 16, 256, 2048, 8192),
        "prefill": 2048, "decode_batches": (1, 4, 16, 64), "context": 1024, "dtype": "bfloat16",
    },
    "tiny": {
        "models": {"smollm2-135m-shapes": (576, 1536, 9, 3)},
        "gemm_m": (1, 16, 33),
        "prefill": 16, "decode_batches": (1, 4), "context": 16, "dtype": "float32",
    },
}
TARGETS = {"prefill": 1.8, "decode": 2.5}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", "--interpret", dest="tiny", action="store_true",
                   help="CPU, TRITON_INTERPRET=1, SmolLM2-sized shapes (a smoke run, not a speed measurement)")
    p.add_argument("--compile-check", action="store_true", help="also compile every kernel for sm_80 / sm_90")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "kernels.json"))
    p.add_argument("--no-layer", action="store_true", help="skip the decoder-layer benchmark")
    return p.parse_args(argv)


ARGS = parse_args() if __name__ == "__main__" else None
if ARGS is not None and ARGS.tiny:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported (effml imports it via torch)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from effml.kernels import use_kernels  # noqa: E402
from effml.kernels.act_quant import transform_quant, transform_quant_reference  # noqa: E402
from effml.kernels.dispatch import calls  # noqa: E402
from effml.kernels.int4_gemm import int4_gemm, int4_gemm_reference  # noqa: E402
from effml.kernels.w4a16_gemm import w4a16_gemm, w4a16_gemm_reference  # noqa: E402

from effml.core.table import format_table  # noqa: E402
from effml.quant.act import ActQuantizer  # noqa: E402
from effml.quant.hadamard import near_square_factors, random_orthogonal  # noqa: E402
from effml.quant.qlinear import QuantLinear  # noqa: E402
from effml.quant.transforms import KroneckerTransform  # noqa: E402


# --- timing -------------------------------------------------------------------------------------
def bench_ms(fn, gpu: bool) -> float:
    if gpu:
        import triton

        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    fn()  # interpreter: one warm-up, one timed call (only shows that it runs)
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def rel_err(out, ref) -> float:
    return float((out.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-30))


# --- per-GEMM -----------------------------------------------------------------------------------
def gemm_shapes(hidden, inter, heads, kv_heads):
    kv = hidden // heads * kv_heads
    shapes = [("q,o" if kv != hidden else "q,k,v,o", hidden, hidden)]
    if kv != hidden:
        shapes.append(("k,v", kv, hidden))
    return shapes + [("gate,up", inter, hidden), ("down", hidden, inter)]


def factors(k, g, device):
    n1, n2 = near_square_factors(k)
    return (random_orthogonal(n1, g).float().to(device), random_orthogonal(n2, g).float().to(device))


def gemm_row(model, proj, n, k, m, dtype, device, gpu, g):
    x = torch.randn(m, k, generator=g).to(device, dtype)
    w = (torch.randn(n, k, generator=g) / k**0.5).to(device, dtype)
    w_packed = torch.randint(0, 256, (n, k // 2), generator=g, dtype=torch.uint8).to(device)
    w_scale = (torch.rand(n, generator=g) * 0.02 + 1e-3).half().to(device)
    scales = w_scale[:, None].contiguous()
    left, right = factors(k, g, device)
    clip = 0.9

    def w4a4():
        packed, sa = transform_quant(x, left, right, clip)
        return int4_gemm(packed, sa, w_packed, w_scale, out_dtype=dtype)

    packed, sa = transform_quant(x, left, right, clip)
    row = {"model": model, "proj": proj, "N": n, "K": k, "M": m,
           "torch_ms": bench_ms(lambda: F.linear(x, w), gpu),
           "w4a4_ms": bench_ms(w4a4, gpu),
           "quant_ms": bench_ms(lambda: transform_quant(x, left, right, clip), gpu),
           "int4_gemm_ms": bench_ms(lambda: int4_gemm(packed, sa, w_packed, w_scale, out_dtype=dtype), gpu),
           "w4a16_ms": bench_ms(lambda: w4a16_gemm(x, w_packed, scales), gpu)}
    row["w4a4_x"] = row["torch_ms"] / row["w4a4_ms"]
    row["w4a16_x"] = row["torch_ms"] / row["w4a16_ms"]
    ref_packed, ref_sa = transform_quant_reference(x, left, right, clip)
    row["w4a4_err"] = rel_err(w4a4(), int4_gemm_reference(ref_packed, ref_sa, w_packed, w_scale, out_dtype=dtype))
    row["w4a16_err"] = rel_err(w4a16_gemm(x, w_packed, scales), w4a16_gemm_reference(x, w_packed, scales))
    return row


# --- decoder layer ------------------------------------------------------------------------------
def llama_layer(hidden, inter, heads, kv_heads, dtype, device):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_attention_heads=heads,
                      num_key_value_heads=kv_heads, num_hidden_layers=1, max_position_embeddings=8192)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    layer = LlamaDecoderLayer(cfg, layer_idx=0).to(device, dtype).eval()
    with torch.no_grad():
        for p in layer.parameters():
            if p.dim() == 2:
                p.normal_(0, p.shape[1] ** -0.5)
    return cfg, layer, LlamaRotaryEmbedding(cfg).to(device)


@torch.no_grad()
def quantize_layer(layer, cfg, dtype, g):
    """W4A4 FlatQuant-style layer: online Kronecker transforms (q/k/v and gate/up share one, o_proj
    one across heads, down_proj its own), their inverse merged into the weights, RTN 4-bit weights,
    4-bit per-token activations with clip 0.9. Quality is irrelevant here; shapes and paths are real."""
    import copy

    q = copy.deepcopy(layer)
    device = next(layer.parameters()).device
    heads = cfg.num_attention_heads
    groups = {"hidden": factors(cfg.hidden_size, g, device), "inter": factors(cfg.intermediate_size, g, device),
              "heads": (random_orthogonal(heads, g).float().to(device), None)}
    where = {"self_attn.q_proj": "hidden", "self_attn.k_proj": "hidden", "self_attn.v_proj": "hidden",
             "self_attn.o_proj": "heads", "mlp.gate_proj": "hidden", "mlp.up_proj": "hidden", "mlp.down_proj": "inter"}
    for name, group in where.items():
        lin = q.get_submodule(name)
        left, right = groups[group]
        t = KroneckerTransform.from_factors(left, right, lin.in_features).to(device)
        ql = QuantLinear(lin.in_features, lin.out_features, bias=False, dtype=dtype)
        ql.set_quantized_weight(t.merge_into(lin.weight.float()), 4, True, None)
        ql.input_transform, ql.act_quant = t, ActQuantizer(4, sym=True, clip=0.9)
        parent, _, attr = name.rpartition(".")
        setattr(q.get_submodule(parent), attr, ql.to(device))
    return q


def layer_rows(model, dims, preset, dtype, device, gpu, g):
    from transformers import DynamicCache

    cfg, layer, rope = llama_layer(*dims, dtype, device)
    qlayer = quantize_layer(layer, cfg, dtype, g)
    kv_heads, head_dim = cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
    rows = []
    cases = [("prefill", 1, preset["prefill"])] + [("decode", b, 1) for b in preset["decode_batches"]]
    for phase, batch, tokens in cases:
        x = torch.randn(batch, tokens, cfg.hidden_size, generator=g).to(device, dtype)
        start = 0 if phase == "prefill" else preset["context"]
        pos = torch.arange(start, start + tokens, device=device)[None].expand(batch, -1)
        pe = rope(x, pos)
        cache = None
        if phase == "decode":
            cache = DynamicCache(config=cfg)
            kv = torch.randn(batch, kv_heads, preset["context"], head_dim, generator=g).to(device, dtype)
            cache.update(kv, kv.clone(), 0)

        def step(mod, cache=cache, x=x, pe=pe):
            out = mod(x, position_embeddings=pe, cache=cache)
            if cache is not None:
                cache.crop(-x.shape[1])  # back to the context: every timed step sees the same cache
            return out[0] if isinstance(out, tuple) else out

        with torch.no_grad():
            with use_kernels("torch"):
                ref = step(qlayer)
            with use_kernels("triton"):
                before = calls["w4a4"]
                out = step(qlayer)
                used = calls["w4a4"] - before
                q_ms = bench_ms(lambda: step(qlayer), gpu)
            t_ms = bench_ms(lambda: step(layer), gpu)
        rows.append({"model": model, "phase": phase, "batch": batch, "tokens": tokens,
                     "context": start, "torch_ms": t_ms, "w4a4_ms": q_ms, "w4a4_x": t_ms / q_ms,
                     "err_vs_torch_path": rel_err(out, ref), "kernel_linears": used})
    return rows


# --- targets, compile check, main ---------------------------------------------------------------
def targets(layers, gpu):
    out = {}
    for phase, need in TARGETS.items():
        sel = [r for r in layers if r["phase"] == phase and (phase == "prefill" or r["batch"] <= 16)]
        worst = min((r["w4a4_x"] for r in sel), default=None)
        out[phase] = {"target_x": need, "worst_layer_x": worst,
                      "status": "not measured (interpreter)" if not gpu or worst is None
                      else ("met" if worst >= need else "not met")}
    return out


def compile_check():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = "import json; from effml.kernels.compile_check import compile_all; print(json.dumps(compile_all()))"
    start = time.perf_counter()
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    if res.returncode:
        return {"ok": False, "error": res.stderr[-2000:]}
    rows = json.loads(res.stdout.strip().splitlines()[-1])
    return {"ok": True, "variants": len(rows), "seconds": round(time.perf_counter() - start, 1), "rows": rows}


def main(args) -> dict:
    gpu = not args.tiny
    if gpu and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --tiny (CPU, interpreted) or on a GPU")
    preset = PRESETS["tiny" if args.tiny else "gpu"]
    device, dtype = ("cuda" if gpu else "cpu"), getattr(torch, preset["dtype"])
    g = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    gemms = []
    for model, dims in preset["models"].items():
        for proj, n, k in gemm_shapes(*dims):
            for m in preset["gemm_m"]:
                gemms.append(gemm_row(model, proj, n, k, m, dtype, device, gpu, g))
                print(f"gemm {model} {proj} N={n} K={k} M={m}: {gemms[-1]['w4a4_x']:.2f}x", flush=True)
    layers = []
    if not args.no_layer:
        for model, dims in preset["models"].items():
            layers += layer_rows(model, dims, preset, dtype, device, gpu, g)
    result = {
        "mode": "gpu" if gpu else "interpret (CPU, TRITON_INTERPRET=1: times are not GPU times)",
        "device": torch.cuda.get_device_name() if gpu else "cpu",
        "dtype": preset["dtype"], "torch": torch.__version__, "seconds": None,
        "targets": targets(layers, gpu), "gemm": gemms, "layer": layers,
    }
    if args.compile_check:
        result["compile_check"] = compile_check()
    result["seconds"] = round(time.perf_counter() - start, 1)
    return result


def report(result, out: str) -> None:
    base = "torch_ms" if result["mode"] == "gpu" else "torch_ms (cpu fp32)"
    cols = ["model", "proj", "N", "K", "M", "torch_ms", "w4a4_ms", "quant_ms", "int4_gemm_ms", "w4a16_ms",
            "w4a4_x", "w4a16_x", "w4a4_err", "w4a16_err"]
    print(f"\nmode: {result['mode']}, dtype {result['dtype']} (baseline column: {base})\n")
    print(format_table(result["gemm"], cols))
    if result["layer"]:
        print()
        print(format_table(result["layer"]))
    print("\ntargets:", json.dumps(result["targets"]))
    if "compile_check" in result:
        cc = result["compile_check"]
        print("compile check:", {k: v for k, v in cc.items() if k != "rows"})
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=1))
    print(f"wrote {out} ({result['seconds']} s)")


if __name__ == "__main__":
    report(main(ARGS), ARGS.out)
