"""The symmetric weight grid option (issue 14): absmax/7 (effml) vs absmax/7.5 (reference GPTQ,
llm-compressor), and float32 scales."""

import pytest
import torch

from effml.core.hessian import Hessian
from effml.quant.config import QuantConfig
from effml.quant.gptq import gptq_quantize
from effml.quant.qlinear import QuantLinear
from effml.quant.quantizers import SYM_GRIDS, fake_quant_weight, weight_qparams


def test_minmax15_grid_is_the_hand_computation():
    w = torch.tensor([[0.3, -0.7, 1.5, -1.5, 0.0, 0.9]])
    s = torch.tensor(1.5 / 7.5).half().float()  # the reference grid, scale stored as float16
    codes = torch.clamp(torch.round(w / s), -8, 7)
    expected = codes * s
    scale, zero = weight_qparams(w, 4, True, grid="minmax15")
    assert scale.item() == s.item() and zero.item() == 0
    torch.testing.assert_close(fake_quant_weight(w, 4, True, grid="minmax15"), expected)
    assert codes.tolist() == [[2, -4, 7, -8, 0, 5]]  # all 16 codes reachable: -8 is used
    # the default grid is unchanged: absmax / 7, codes -7..7
    scale7, _ = weight_qparams(w, 4, True)
    assert scale7.item() == torch.tensor(1.5 / 7).half().item()
    assert fake_quant_weight(w, 4, True).abs().max() <= 1.5 + 1e-6


def test_fp32_scales_skip_the_float16_rounding():
    w = torch.tensor([[0.3, -0.7, 1.2345678]])
    s32, _ = weight_qparams(w, 4, True, fp16_scales=False, grid="minmax15")
    s16, _ = weight_qparams(w, 4, True, grid="minmax15")
    assert s32.item() == pytest.approx(1.2345678 / 7.5, rel=1e-7)
    assert s16.item() == torch.tensor(1.2345678 / 7.5).half().item()


def test_grid_option_validated():
    assert "minmax15" in SYM_GRIDS
    assert QuantConfig(w_sym_grid="minmax15").w_sym_grid == "minmax15"
    with pytest.raises(ValueError, match="grid"):
        QuantConfig(w_sym_grid="absmax8")
    with pytest.raises(ValueError, match="grid"):
        weight_qparams(torch.randn(2, 4), 4, True, grid="nope")


def _correlated_inputs(n, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) / d**0.5 + torch.eye(d)
    return (torch.randn(n, d, generator=g) * torch.logspace(-1, 1, d)) @ mix


@pytest.mark.parametrize("group_size,act_order", [(None, True), (16, True), (16, False)])
def test_gptq_minmax15_beats_rtn_and_stores_exactly(group_size, act_order):
    torch.manual_seed(0)
    w = torch.randn(32, 64)
    x = _correlated_inputs(512, 64)
    h = Hessian(64)
    h.add(x)
    q, scale, zero, _ = gptq_quantize(w, h.h, 4, True, group_size, block_size=16, act_order=act_order,
                                      grid="minmax15")
    rtn = fake_quant_weight(w, 4, True, group_size, grid="minmax15")
    err = lambda a: float(((x @ (a - w).T) ** 2).sum())  # noqa: E731
    assert err(q) < 0.7 * err(rtn)
    g = 64 if group_size is None else group_size
    codes = (q.reshape(32, -1, g) / scale[..., None]).reshape(32, 64)
    assert (codes - codes.round()).abs().max() < 1e-3
    assert codes.round().min() >= -8 and codes.round().max() <= 7
    # QuantLinear stores those codes and float16 scales exactly: dequantized == GPTQ's output
    lin = QuantLinear.from_linear(torch.nn.Linear(64, 32, bias=False))
    deq = lin.set_quantized_weight(q, 4, True, group_size, scale=scale, zero=zero)
    torch.testing.assert_close(deq, q, rtol=0, atol=1e-6)


def test_gptq_fp32_scales_on_grid():
    torch.manual_seed(1)
    w = torch.randn(8, 32)
    x = _correlated_inputs(256, 32, seed=1)
    h = Hessian(32)
    h.add(x)
    q, scale, _, _ = gptq_quantize(w, h.h, 4, True, None, block_size=8, fp16_scales=False)
    assert not torch.equal(scale, scale.half().float())  # not rounded to float16
    codes = q / scale
    assert (codes - codes.round()).abs().max() < 1e-4
