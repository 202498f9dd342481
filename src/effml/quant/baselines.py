"""Plain RTN and GPTQ: no transforms, just quantizers on the original weights/activations."""

from __future__ import annotations

from .api import register_method
from .apply import quantize_weights, set_activation_quant, set_kv_quant, wrap_linears
from .config import QuantConfig


@register_method("rtn")
def rtn(model, cfg: QuantConfig, calib):
    wrap_linears(model)
    set_activation_quant(model, cfg)
    set_kv_quant(model, cfg)
    cfg.weight_quantizer = "rtn"
    return quantize_weights(model, cfg, calib)


@register_method("gptq")
def gptq(model, cfg: QuantConfig, calib):
    wrap_linears(model)
    set_activation_quant(model, cfg)
    set_kv_quant(model, cfg)
    cfg.weight_quantizer = "gptq"
    return quantize_weights(model, cfg, calib)
