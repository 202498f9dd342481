"""Kernels, installed as ``effml.kernels``: Triton kernels for GPUs (each beside a plain-torch
reference with the same numerics; on CPU, tests run them under ``TRITON_INTERPRET=1``) and
QuantLinear's CPU paths on PyTorch's integer kernels (``cpu_int4``, ``cpu_int8``). Kernels are
optional accelerators and the torch path always works."""

from __future__ import annotations

import importlib.util
import os


def has_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_usable(device) -> bool:
    """Whether a Triton kernel can run for tensors on ``device``: a GPU, or the interpreter."""
    if not has_triton():
        return False
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True
    return getattr(device, "type", str(device)) == "cuda"


# QuantLinear's switch between the kernels and its torch path (imports no Triton itself)
from .dispatch import cpu_weight_only_dtype, keep_dense_cache, kernel_mode, prepare, use_kernels  # noqa: E402

__all__ = ["cpu_weight_only_dtype", "has_triton", "keep_dense_cache", "kernel_mode", "prepare", "triton_usable",
           "use_kernels"]
