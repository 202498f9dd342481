"""Triton kernels, installed as ``effml.kernels``. Each kernel sits beside a plain-torch
reference with the same numerics; kernels are optional accelerators and the torch path always
works (on CPU, tests run the kernels under ``TRITON_INTERPRET=1``)."""

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
from .dispatch import kernel_mode, use_kernels  # noqa: E402

__all__ = ["has_triton", "kernel_mode", "triton_usable", "use_kernels"]
