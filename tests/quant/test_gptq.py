import pytest
import torch

from effml.core.hessian import Hessian
from effml.quant.gptq import gptq_quantize
from effml.quant.quantizers import fake_quant_weight


def _correlated_inputs(n, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) / d**0.5 + torch.eye(d)
    scales = torch.logspace(-1, 1, d)
    return (torch.randn(n, d, generator=g) * scales) @ mix


@pytest.mark.parametrize("group_size,act_order", [(None, True), (None, False), (16, False), (16, True)])
def test_gptq_beats_rtn_output_error(group_size, act_order):
    torch.manual_seed(0)
    w = torch.randn(32, 64)
    x = _correlated_inputs(512, 64)
    h = Hessian(64)
    for chunk in x.split(100):
        h.add(chunk)
    torch.testing.assert_close(h.h, 2 * x.double().T @ x.double() / len(x))
    q, scale, zero, _ = gptq_quantize(w, h.h, 3, sym=True, group_size=group_size, block_size=16, act_order=act_order)
    rtn = fake_quant_weight(w, 3, True, group_size)
    err_gptq = ((x @ (q - w).T) ** 2).sum()
    err_rtn = ((x @ (rtn - w).T) ** 2).sum()
    assert err_gptq < 0.7 * err_rtn
    # every weight lies on its group's grid
    g = 64 if group_size is None else group_size
    codes = (q.reshape(32, -1, g) / scale[..., None]).reshape(32, 64)
    assert (codes - codes.round()).abs().max() < 1e-3


def test_gptq_nan_hessian_names_the_layer():
    h = torch.full((8, 8), float("nan"))
    with pytest.raises(FloatingPointError, match="layers.3.mlp.down_proj"):
        gptq_quantize(torch.randn(4, 8), h, 4, name="layers.3.mlp.down_proj")
