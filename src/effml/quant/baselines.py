"""Plain RTN and GPTQ: no transforms, just quantizers on the original weights/activations."""

from __future__ import annotations

from .api import register_method
from .apply import quantize_weights, set_activation_quant, set_kv_quant, wrap_linears
from .config import QuantConfig


def _plain(weight_quantizer: str):
    """Weights by ``weight_quantizer`` with per-token activations and KV cache, no transform."""

    def run(model, cfg: QuantConfig, calib):
        wrap_linears(model)
        set_activation_quant(model, cfg)
        set_kv_quant(model, cfg)
        cfg.weight_quantizer = weight_quantizer
        return quantize_weights(model, cfg, calib)

    return run


rtn = register_method("rtn")(_plain("rtn"))
gptq = register_method("gptq")(_plain("gptq"))
