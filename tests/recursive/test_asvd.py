"""Activation-aware SVD LoRA init (``lora_init="asvd"``): optimal in the output-error norm,
exact at full rank, nested under truncation, and the tied-norm rescaling of the inputs."""

import pytest
import torch
import torch.nn as nn
from recursive_helpers import copy_of, rel_err, tiny_with_biases

from effml.core.arch import get_arch, get_submodule
from effml.recursive import DepthLoRALinear, input_grams, recursify, truncate_ranks
from effml.testing import FAMILIES, random_ids


def _sym_power(g: torch.Tensor, p: float) -> torch.Tensor:
    e, v = torch.linalg.eigh(g)
    return (v * e.pow(p)) @ v.T


def _weighted_optimum(residual: torch.Tensor, gram: torch.Tensor, r: int) -> torch.Tensor:
    """argmin over rank-r M of tr((R - M) G (R - M)ᵀ), via the symmetric square root of G
    (an independent route from the code's Cholesky factor)."""
    half, inv_half = _sym_power(gram, 0.5), _sym_power(gram, -0.5)
    u, s, vh = torch.linalg.svd(residual @ half, full_matrices=False)
    return (u[:, :r] * s[:r]) @ vh[:r] @ inv_half


def test_asvd_matches_weighted_low_rank_optimum():
    torch.manual_seed(0)
    x = torch.randn(400, 10, dtype=torch.float64)
    x[:, 3] *= 30  # one channel with large inputs, like a massive-activation channel
    gram = x.T @ x / x.shape[0]
    residual = torch.randn(12, 10, dtype=torch.float64)
    m = DepthLoRALinear(nn.Parameter(torch.zeros(12, 10, dtype=torch.float64)), None, {"q": (0, 12)}, {"q": 3})
    kind, kept = m.init_from_residual("q", residual, None, torch.Generator().manual_seed(0), gram=gram, damp=0.0)
    assert kind == "asvd"
    got = m.lora_B["q"] @ m.lora_A["q"]
    best = _weighted_optimum(residual, gram, 3)
    assert torch.allclose(got, best, atol=1e-8)
    assert torch.allclose(m.lora_A["q"].norm(dim=1), torch.ones(3, dtype=torch.float64))  # unit rows, as plain SVD

    def out_err(delta):
        return ((residual - delta) @ x.T).norm()

    assert kept == pytest.approx(1 - (out_err(best) / out_err(torch.zeros_like(best))).item(), abs=1e-8)
    u, s, vh = torch.linalg.svd(residual)
    plain = (u[:, :3] * s[:3]) @ vh[:3]
    assert out_err(got) < 0.9 * out_err(plain)  # the plain SVD spends its rank off the big channel


@pytest.mark.parametrize("family", FAMILIES)
def test_asvd_full_rank_untied_norms_reproduces_original(family):
    model = tiny_with_biases(family)
    ids = random_ids(model)
    with torch.no_grad():
        ref = model(input_ids=ids, use_cache=False).logits
    rec = recursify(copy_of(model), num_loops=2, init="average", lora_rank="full", lora_init="asvd",
                    calib=random_ids(model, seed=1), tie_norms=False)
    assert rec.effml_report["recursify"]["lora_inits"].get("asvd", 0) > 0
    with torch.no_grad():
        assert rel_err(rec(input_ids=ids, use_cache=False).logits, ref) < 1e-4


def test_asvd_truncation_is_nested_and_needs_calib():
    model = tiny_with_biases("llama")
    calib = random_ids(model, seed=1)
    big = recursify(copy_of(model), num_loops=2, init="average", lora_rank=8, lora_init="asvd", calib=calib)
    small = recursify(copy_of(model), num_loops=2, init="average", lora_rank=4, lora_init="asvd", calib=calib)
    truncate_ranks(big, 4)
    ids = random_ids(model)
    with torch.no_grad():
        assert rel_err(big(ids).logits, small(ids).logits) < 1e-5
    with pytest.raises(ValueError, match="calib"):
        recursify(copy_of(model), num_loops=2, lora_rank=4, lora_init="asvd")
    # statistics computed once serve several conversions and give the same factors
    grams = input_grams(model, calib)
    again = recursify(copy_of(model), num_loops=2, init="average", lora_rank=4, lora_init="asvd", grams=grams)
    with torch.no_grad():
        assert torch.equal(again(ids).logits, small(ids).logits)
    with pytest.raises(ValueError, match="one dict per layer"):
        recursify(copy_of(model), num_loops=2, lora_rank=4, lora_init="asvd", grams=grams[:1])


def test_asvd_weights_tied_norm_inputs_by_the_shared_scale():
    """With tied norms the LoRA sees the *shared* norm's output; the init must minimise the error
    of the original layer's outputs on those inputs. Reference: least squares on captured inputs."""
    model = tiny_with_biases("llama")
    calib = random_ids(model, n=8, seq_len=32, seed=1)
    arch = get_arch(model)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():  # norm scales that differ a lot between the tied depths
        for lay in get_submodule(model, arch.layers):
            w = lay.input_layernorm.weight
            w.mul_(torch.exp(0.7 * torch.randn(w.shape, generator=g)))
    depth, r = 3, 2
    layer = get_submodule(model, arch.layers)[depth]
    captured = []
    h = layer.self_attn.q_proj.register_forward_hook(lambda mod, inp, out: captured.append(inp[0].detach()))
    with torch.no_grad():
        model(calib)
    h.remove()
    x_orig = torch.cat(captured).reshape(-1, layer.self_attn.q_proj.in_features).double()
    g_orig = layer.input_layernorm.weight.detach().double()
    w_orig = layer.self_attn.q_proj.weight.detach().double()

    rec = recursify(copy_of(model), num_loops=2, init="average", lora_rank=r, lora_init="asvd", calib=calib,
                    tie_norms=True)
    rlayer = get_submodule(rec, arch.layers)[depth]
    g_shared = rlayer.input_layernorm.weight.detach().double()
    assert not torch.allclose(g_shared, g_orig)  # the norm really changed
    q = rlayer.self_attn.q_proj
    x_shared = x_orig * (g_shared / g_orig)  # what the tied block's q_proj is fed
    target = x_orig @ w_orig.T
    base = x_shared @ q.weight.detach().double().T
    residual = torch.linalg.lstsq(x_shared, target - base).solution.T  # R with x_shared R^T = target - base
    gram = x_shared.T @ x_shared / x_shared.shape[0]
    best = _weighted_optimum(residual, gram, r)

    def err(delta):
        return (target - base - x_shared @ delta.T).norm().item()

    got = (q.lora_B["q"] @ q.lora_A["q"]).detach().double()
    assert err(got) <= 1.0005 * err(best)  # damping (1% of the mean diagonal) costs almost nothing here
    u, s, vh = torch.linalg.svd(residual)
    assert err(got) < err((u[:, :r] * s[:r]) @ vh[:r])
