"""The kernels compile for real GPUs (sm_80 Ampere, sm_90 Hopper) without one: Triton's compiler
and its bundled ptxas run on CPU. The interpreter cannot catch lowering errors (dot shape limits,
dtype rules, shared-memory layouts); this does. A subprocess, because this session's kernels are
interpreted."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest


def _nvidia_backend() -> bool:
    return importlib.util.find_spec("triton.backends.nvidia") is not None


@pytest.mark.skipif(not _nvidia_backend(), reason="this triton build has no NVIDIA backend")
def test_every_kernel_compiles_for_ampere_and_hopper_with_int8_tensor_cores():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-m", "effml.kernels.compile_check", "--arch", "80", "90", "--quick"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = json.loads(res.stdout)
    assert {r["arch"] for r in rows} == {"sm_80", "sm_90"}
    assert {r["kernel"] for r in rows} == {"transform_quant", "int4_gemm", "w4a16_gemm"}
    for r in rows:
        assert r["mma"], f"{r} uses no tensor-core instruction"
        if r["kernel"] == "int4_gemm":  # unpacked int4 -> int8 MMA, int32 accumulate
            assert all(".s32.s8.s8" in i for i in r["mma"]), r
