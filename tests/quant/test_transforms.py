import pytest
import torch

from effml.quant.transforms import kron_apply, kron_apply_weight_inverse


@pytest.mark.parametrize("n1,n2", [(3, 5), (7, 9), (1, 11)])
def test_kronecker_transform_then_inverse_is_identity(n1, n2):
    g = torch.Generator().manual_seed(n1 * n2)
    left = torch.randn(n1, n1, generator=g, dtype=torch.float64) + n1 * torch.eye(n1, dtype=torch.float64)
    right = torch.randn(n2, n2, generator=g, dtype=torch.float64) + n2 * torch.eye(n2, dtype=torch.float64)
    x = torch.randn(4, n1 * n2, generator=g, dtype=torch.float64)
    y = kron_apply(x, left, right)
    torch.testing.assert_close(y, x @ torch.kron(left, right))
    back = kron_apply(y, torch.linalg.inv(left), torch.linalg.inv(right))
    assert (back - x).abs().max() < 1e-5
    w = torch.randn(3, n1 * n2, generator=g, dtype=torch.float64)
    torch.testing.assert_close(y @ kron_apply_weight_inverse(w, left, right).T, x @ w.T)
