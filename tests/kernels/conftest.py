"""Kernel tests run the Triton kernels in the interpreter, on CPU tensors.

Triton picks "interpreted" or "compiled" when a kernel is decorated, i.e. when its module is
first imported, from TRITON_INTERPRET. So: set it, import (or re-import) the quantization kernel
modules, then put the variable back as it was, so tests elsewhere in the session see the
environment they started with. (The kernels use no jit function of triton.language.standard,
so this works whether triton itself was first imported with the variable set or not.) QuantLinear's default "auto" mode looks only at the device, never
at this variable, so other tests keep the torch path either way.
"""

import importlib
import os
import sys

_KERNEL_MODULES = ("effml.kernels.launch", "effml.kernels.act_quant", "effml.kernels.int4_gemm",
                   "effml.kernels.w4a16_gemm")

_previous = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"
try:
    try:  # triton imports gluon lazily at the first launch, and gluon checks the variable then
        import triton.experimental.gluon  # noqa: F401
    except ImportError:
        pass
    from effml.kernels import launch

    _stale = not launch.interpreted(launch.round_to)  # kernels were imported compiled earlier: redo them all
    for _name in _KERNEL_MODULES:
        if _name not in sys.modules:
            importlib.import_module(_name)
        elif _stale:
            importlib.reload(sys.modules[_name])
finally:
    if _previous is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = _previous
