import torch
import torch.nn as nn
import torch.nn.functional as F

from effml.quant.act import ActQuantizer
from effml.quant.qlinear import QuantLinear
from effml.quant.quantizers import fake_quant_rows, fake_quant_weight
from effml.quant.transforms import KroneckerTransform


def _linear(seed=0, bias=True):
    torch.manual_seed(seed)
    return nn.Linear(48, 20, bias=bias)


def test_sixteen_bit_is_the_original_linear():
    lin = _linear()
    q = QuantLinear.from_linear(lin)
    x = torch.randn(3, 5, 48)
    assert torch.equal(q(x), lin(x))


def test_w4a4_forward_matches_plain_torch():
    lin = _linear()
    q = QuantLinear.from_linear(lin)
    q.act_quant = ActQuantizer(4, sym=True)
    q.set_quantized_weight(lin.weight.detach(), 4, sym=False, group_size=16)
    x = torch.randn(2, 7, 48)
    ref = F.linear(fake_quant_rows(x, 4, True), fake_quant_weight(lin.weight.detach(), 4, False, 16), lin.bias)
    torch.testing.assert_close(q(x), ref, rtol=0, atol=1e-5)


def test_storage_is_about_four_bits_per_weight():
    lin = nn.Linear(512, 256, bias=False)
    q = QuantLinear.from_linear(lin)
    q.set_quantized_weight(lin.weight.detach(), 4)
    n, n_bytes = q.effml_storage()
    assert n == 512 * 256
    assert 4.0 < 8 * n_bytes / n < 4.1  # packed nibbles + one fp16 scale per row
    assert q.qweight.dtype == torch.uint8 and q.qweight.numel() == n // 2


def test_input_transform_with_merged_inverse_is_exact():
    lin = _linear(bias=False)
    torch.manual_seed(3)
    left, right = torch.randn(6, 6) + 3 * torch.eye(6), torch.randn(8, 8) + 3 * torch.eye(8)
    t = KroneckerTransform.from_factors(left, right, 48, scale=torch.rand(48) + 0.5)
    q = QuantLinear.from_linear(nn.Linear(48, 20, bias=False))
    q.weight = nn.Parameter(t.merge_into(lin.weight.detach()))
    q.input_transform = t
    x = torch.randn(4, 48)
    torch.testing.assert_close(q(x), lin(x), rtol=0, atol=1e-4)
    # the transform is x (L ⊗ R) after scaling, as a dense matrix would give
    dense = (x * t.scale) @ torch.kron(left, right)
    torch.testing.assert_close(t(x), dense, rtol=1e-5, atol=1e-4)
