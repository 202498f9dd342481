"""Compile the kernels ahead of time for NVIDIA targets, without a GPU.

Triton's compiler and ptxas run on any machine, so this checks what the interpreter cannot:
that every kernel variant (each autotune config, each dtype) lowers to PTX and a cubin for
Ampere (sm_80) and Hopper (sm_90), and which tensor-core instructions it uses (int8 ``mma`` /
``wgmma``). Run it in a process where ``TRITON_INTERPRET`` is unset:

    python -m effml.kernels.compile_check --arch 80 90
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import time

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import act_quant, int4_gemm, w4a16_gemm
from .launch import interpreted, pow2_at_least

log = logging.getLogger(__name__)

_PTR = {"fp32": "*fp32", "fp16": "*fp16", "bf16": "*bf16"}
_MMA = re.compile(r"\b((?:wgmma\.mma_async|mma\.sync)\.[\w.]+)")


def _compile(fn, sig: dict, const: dict, arch: int, num_warps: int, num_stages: int) -> dict:
    sig = dict(sig)
    for k in const:
        sig[k] = "constexpr"
    start = time.perf_counter()
    k = triton.compile(ASTSource(fn, sig, constexprs=const), target=GPUTarget("cuda", arch, 32),
                       options={"num_warps": num_warps, "num_stages": num_stages})
    return {"arch": f"sm_{arch}", "seconds": round(time.perf_counter() - start, 2),
            "shared_bytes": int(k.metadata.shared), "mma": sorted(set(_MMA.findall(k.asm["ptx"])))}


def transform_quant_variant(k: int, dtype: str, arch: int, smul: bool = True) -> dict:
    from effml.quant.hadamard import near_square_factors

    n1, n2 = near_square_factors(k)
    sig = {"x_ptr": _PTR[dtype], "left_ptr": "*fp32", "right_ptr": "*fp32", "smul_ptr": "*fp32", "out_ptr": "*u8",
           "scale_ptr": "*fp32", "clip": "fp32", "M": "i32", "stride_xm": "i32", "stride_om": "i32"}
    const = dict(N1=n1, N2=n2, N1P=pow2_at_least(n1), N2P=pow2_at_least(n2), H2P=pow2_at_least(n2 // 2),
                 HAS_LEFT=True, HAS_RIGHT=True, HAS_SMUL=smul, OFFSET=8, TOKENS=4,
                 PRECISION="ieee" if dtype == "fp32" else "tf32", UPCAST=False)
    warps = 4 if const["N1P"] * const["N2P"] <= 64 * 64 else 8
    info = _compile(act_quant._transform_quant_kernel, sig, const, arch, warps, 1)
    return {"kernel": "transform_quant", "variant": f"K={k} ({n1}x{n2}) {dtype}", **info}


def int4_gemm_variant(cfg: triton.Config, out: str, arch: int) -> dict:
    sig = {"a_ptr": "*u8", "w_ptr": "*u8", "sa_ptr": "*fp32", "sw_ptr": "*fp32", "bias_ptr": "*fp32",
           "c_ptr": _PTR[out], "M": "i32", "N": "i32", "KH": "i32", "stride_am": "i32", "stride_wn": "i32",
           "stride_cm": "i32", "M_BUCKET": "i32"}
    const = dict(A_OFF=8, W_OFF=8, HAS_BIAS=True, OUT_INT32=False, UPCAST=False, **cfg.kwargs)
    info = _compile(int4_gemm._int4_gemm_kernel, sig, const, arch, cfg.num_warps, cfg.num_stages)
    return {"kernel": "int4_gemm", "variant": f"{_cfg_name(cfg)} -> {out}", **info}


def w4a16_variant(cfg: triton.Config, dtype: str, group_kh: int, arch: int) -> dict:
    sig = {"x_ptr": _PTR[dtype], "w_ptr": "*u8", "s_ptr": "*fp16", "z_ptr": "*u8", "bias_ptr": "*fp32",
           "c_ptr": _PTR[dtype], "M": "i32", "N": "i32", "KH": "i32", "stride_xm": "i32", "stride_wn": "i32",
           "stride_sn": "i32", "stride_zn": "i32", "stride_cm": "i32", "M_BUCKET": "i32"}
    const = dict(W_OFF=8, GROUP_KH=group_kh, HAS_ZERO=group_kh > 0, HAS_BIAS=True,
                 PRECISION="ieee" if dtype == "fp32" else "tf32", UPCAST=False, **cfg.kwargs)
    info = _compile(w4a16_gemm._w4a16_kernel, sig, const, arch, cfg.num_warps, cfg.num_stages)
    layout = "per-channel sym" if group_kh == 0 else f"group {2 * group_kh} asym"
    return {"kernel": "w4a16_gemm", "variant": f"{_cfg_name(cfg)} {dtype} {layout}", **info}


def _cfg_name(cfg: triton.Config) -> str:
    kw = cfg.kwargs
    return f"{kw['BLOCK_M']}x{kw['BLOCK_N']}x{kw['BLOCK_KH']}/w{cfg.num_warps}s{cfg.num_stages}"


def compile_all(archs=(80, 90), full: bool = True) -> list[dict]:
    """Every autotune config and activation dtype (``full``), or one variant per kernel."""
    if interpreted(act_quant._transform_quant_kernel):
        raise RuntimeError("the kernels were imported under TRITON_INTERPRET=1: run this in a process without it")
    rows = []
    for arch in archs:
        ks = (576, 1536, 4096, 11008, 14336) if full else (1536,)
        dtypes = ("fp16", "bf16", "fp32") if full else ("bf16",)
        for k in ks:
            for dt in dtypes if k == 1536 else ("fp16",):
                rows.append(transform_quant_variant(k, dt, arch))
        for cfg in int4_gemm.CONFIGS if full else int4_gemm.CONFIGS[:1]:
            rows.append(int4_gemm_variant(cfg, "fp16", arch))
        if full:
            rows.append(int4_gemm_variant(int4_gemm.CONFIGS[0], "bf16", arch))
        for cfg in w4a16_gemm.CONFIGS if full else w4a16_gemm.CONFIGS[:1]:
            rows.append(w4a16_variant(cfg, "fp16", 0, arch))
            if full or cfg is w4a16_gemm.CONFIGS[0]:
                rows.append(w4a16_variant(cfg, "bf16", 64, arch))
    for r in rows:
        log.info("%s %s %s: %.1fs, %d B shared, %s", r["arch"], r["kernel"], r["variant"], r["seconds"],
                 r["shared_bytes"], ", ".join(r["mma"]))
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, nargs="+", default=[80, 90], help="compute capabilities, e.g. 80 90")
    p.add_argument("--quick", action="store_true", help="one variant per kernel instead of every config")
    args = p.parse_args(argv)
    print(json.dumps(compile_all(tuple(args.arch), full=not args.quick), indent=1))


if __name__ == "__main__":
    main()
