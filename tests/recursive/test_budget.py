"""``recursify(param_budget=...)``: greedy rank allocation by whitened residual energy per
parameter, the auto LoRA init, and per-depth ranks."""

import itertools
import warnings

import pytest
import torch
from recursive_helpers import copy_of, rel_err, tiny_with_biases

import effml
from effml.core.arch import get_arch, get_submodule
from effml.recursive import DepthLoRALinear, greedy_ranks, input_grams, recursify, whitened_energies
from effml.recursive.convert import NO_CALIB_WARNING
from effml.testing import random_ids, tiny_model


# --- the greedy itself -------------------------------------------------------------------------
def _brute_force(energies, costs, budget):
    """Best total energy over every rank choice that fits the budget."""
    keys = list(energies)
    best = -1.0
    for ranks in itertools.product(*(range(len(energies[k]) + 1) for k in keys)):
        cost = sum(0 if r == 0 else costs[k][0] + (r - 1) * costs[k][1] for k, r in zip(keys, ranks))
        if cost <= budget:
            best = max(best, sum(sum(energies[k][:r]) for k, r in zip(keys, ranks)))
    return best


@pytest.mark.parametrize("seed", range(5))
def test_greedy_is_optimal_when_components_cost_the_same(seed):
    g = torch.Generator().manual_seed(seed)
    energies = {k: sorted(torch.rand(4, generator=g).square().tolist(), reverse=True) for k in "abc"}
    costs = dict.fromkeys(energies, (7, 7))
    for budget in (0, 6, 7, 20, 35, 60, 84, 100):
        ranks, used = greedy_ranks(energies, costs, budget)
        got = sum(sum(energies[k][:r]) for k, r in ranks.items())
        assert used == 7 * sum(ranks.values()) <= budget
        assert got == pytest.approx(_brute_force(energies, costs, budget), abs=1e-12)


def test_greedy_follows_energy_per_parameter_and_skips_what_no_longer_fits():
    energies = {"a": [10.0, 1.0], "b": [6.0, 5.0, 4.0]}
    costs = {"a": (5, 5), "b": (2, 2)}
    # ratios: a 2.0, 0.2; b 3.0, 2.5, 2.0. Budget 9: b, b, then a (ties go to the first listed)
    assert greedy_ranks(energies, costs, 9) == ({"a": 1, "b": 2}, 9)
    # budget 8: b, b (4 used); a's 5 no longer fits, so it is dropped and b takes its third
    assert greedy_ranks(energies, costs, 8) == ({"a": 0, "b": 3}, 6)
    # a first component that costs more (a bias correction) makes it a worse buy
    assert greedy_ranks({"a": [4.0, 3.9], "b": [3.0]}, {"a": (4, 2), "b": (2, 2)}, 4) == ({"a": 0, "b": 1}, 2)
    # zero-energy components are never bought, whatever is left
    assert greedy_ranks({"a": [1.0, 0.0]}, {"a": (1, 1)}, 100) == ({"a": 1}, 1)


def test_whitened_energies_are_the_output_error_eigenvalues():
    torch.manual_seed(0)
    x = torch.randn(300, 6, dtype=torch.float64)
    x[:, 2] *= 20
    gram = x.T @ x / 300
    r = torch.randn(5, 6, dtype=torch.float64)
    damped = gram + 0.01 * gram.diagonal().mean() * torch.eye(6, dtype=torch.float64)
    ref = torch.linalg.eigvalsh(r @ damped @ r.T).flip(0)  # E||R x||² split into orthogonal directions
    assert torch.allclose(torch.tensor(whitened_energies(r, gram), dtype=torch.float64), ref, rtol=1e-9, atol=1e-9)
    assert len(whitened_energies(r, gram, max_rank=2)) == 2


# --- recursify with a budget -------------------------------------------------------------------
def _ref_allocation(model, calib, budget_frac, metric):
    """Independent route, tie_norms=False and init='average' (so the residual is W_d - the group
    mean and the LoRA sees the original inputs): energies as eigenvalues of R G Rᵀ (over
    tr(W G Wᵀ) for the relative metric), then a naive greedy that rescans every candidate."""
    arch = get_arch(model)
    layers = get_submodule(model, arch.layers)
    grams = input_grams(model, calib)
    total = effml.recursive.parameter_report(model)["non_embedding"]
    base = total - 2 * sum(p.numel() for p in layers[0].parameters())  # 4 layers -> 2 shared blocks, norms per depth
    base += 2 * sum(p.numel() for n, p in layers[0].named_parameters() if "norm" in n)
    lora_budget = int(budget_frac * total) - base
    weights = {d: {n: p.detach().double() for n, p in layers[d].named_parameters()} for d in range(4)}
    cand = {}
    for d in range(4):
        group = [d % 2, d % 2 + 2]
        for role, path in arch.linears.items():
            w = weights[d][f"{path}.weight"]
            shared = torch.stack([weights[e][f"{path}.weight"] for e in group]).mean(0)
            r = w - shared
            g = grams[d][path].double()
            g = g + 0.01 * g.diagonal().mean() * torch.eye(g.shape[0], dtype=torch.float64)
            e = torch.linalg.eigvalsh(r @ g @ r.T).flip(0)[: min(r.shape)].clamp_min(0)
            if metric == "relative":
                e = e / torch.trace(w @ g @ w.T)
            cand[(d, role)] = (e.tolist(), sum(r.shape))
    ranks = {k: 0 for k in cand}
    left = lora_budget
    while True:
        best = None
        for k, (e, c) in cand.items():
            i = ranks[k]
            if i < len(e) and c <= left and e[i] > 1e-9 * max(e[0], 1e-30):
                if best is None or e[i] / c > best[0]:
                    best = (e[i] / c, k)
        if best is None:
            return ranks
        ranks[best[1]] += 1
        left -= cand[best[1]][1]


@pytest.mark.parametrize("metric", ["relative", "absolute"])
def test_budget_allocation_matches_an_independent_greedy_and_respects_the_budget(metric):
    model = tiny_model("llama")
    calib = random_ids(model, 4, 24, seed=1)
    ref = _ref_allocation(model, calib, 0.7, metric)
    rec = recursify(copy_of(model), num_loops=2, init="average", tie_norms=False, param_budget=0.7, calib=calib,
                    budget_metric=metric)
    rep = rec.effml_report["recursify"]
    alloc = rep["allocation"]
    got = {(d, role): r for d, ranks in enumerate(alloc["ranks"]) for role, r in ranks.items()}
    assert got == ref
    assert alloc["params_used"] == rep["after"]["non_embedding"] <= alloc["budget_params"]
    assert alloc["budget_params"] == int(0.7 * rep["before"]["non_embedding"])
    # the greedy stops only when no further component fits: less than one component is left over
    assert alloc["budget_params"] - alloc["params_used"] < 64 + 96
    assert rep["config"]["lora_init"] == "asvd" and rep["config"]["param_budget"] == 0.7
    assert rep["config"]["budget_metric"] == alloc["metric"] == metric
    # the ranks really differ per depth and target, and the modules have them
    assert len({tuple(r.values()) for r in alloc["ranks"]}) > 1
    layers = rec.model.layers
    for d, ranks in enumerate(alloc["ranks"]):
        m = layers[d].mlp.down_proj
        assert (m.ranks.get("down", 0) if isinstance(m, DepthLoRALinear) else 0) == ranks["down"]


@pytest.mark.parametrize("family", ["qwen2", "gemma3_text", "phi3"])
def test_budget_is_reproducible_and_met(family):
    model = tiny_with_biases(family)
    calib = random_ids(model, 4, 24, seed=1)
    ids = random_ids(model)
    kw = dict(num_loops=2, init="average", tie_norms="foldable", calib=calib)  # foldable: a LoRA can undo the tying
    a = recursify(copy_of(model), param_budget=0.75, **kw)
    b = recursify(copy_of(model), param_budget=0.75, **kw)
    ra, rb = a.effml_report["recursify"], b.effml_report["recursify"]
    assert ra["allocation"]["ranks"] == rb["allocation"]["ranks"]
    with torch.no_grad():
        assert torch.equal(a(ids).logits, b(ids).logits)
    alloc = ra["allocation"]
    assert ra["after"]["non_embedding"] == alloc["params_used"] <= alloc["budget_params"]
    assert alloc["lora_params"] > 0 and alloc["shared_params"] == ra["after"]["blocks"] + ra["after"]["other"]
    # more budget, closer to the original
    big = recursify(copy_of(model), param_budget=0.95, **kw)
    pure = recursify(copy_of(model), num_loops=2, init="average", tie_norms="foldable")
    with torch.no_grad():
        ref = model(ids).logits
        errs = [rel_err(m(ids).logits, ref) for m in (pure, a, big)]
    assert errs[0] > errs[1] > errs[2]


def test_budget_model_saves_and_loads(tmp_path):
    model = tiny_model("llama")
    rec = recursify(model, num_loops=2, init="average", param_budget=0.7, calib=random_ids(model, 2, 16, seed=1))
    effml.save(rec, tmp_path)
    loaded = effml.load(tmp_path)
    ids = random_ids(rec)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, rec(ids).logits)
    assert loaded.effml_report["recursify"]["allocation"]["ranks"] == rec.effml_report["recursify"]["allocation"]["ranks"]


def test_budget_errors_come_before_any_work():
    model = tiny_model("llama")
    calib = random_ids(model, 2, 16)
    for bad in (1, 1.0, 1.5, 0, -0.2, True, "half"):
        with pytest.raises(ValueError, match=r"param_budget must be a fraction in \(0, 1\)"):
            recursify(copy_of(model), num_loops=2, param_budget=bad, calib=calib)
    with pytest.raises(ValueError, match="param_budget needs calibration data.*effml.calibration_data"):
        recursify(copy_of(model), num_loops=2, param_budget=0.7)
    with pytest.raises(ValueError, match="unknown budget_metric 'fisher'"):
        recursify(copy_of(model), num_loops=2, param_budget=0.7, budget_metric="fisher", calib=calib)
    with pytest.raises(ValueError, match="leave lora_rank at 0"):
        recursify(copy_of(model), num_loops=2, param_budget=0.7, lora_rank=4, calib=calib)
    # 4 layers looped twice: the shared model alone is about half of the original
    with pytest.raises(ValueError, match=r"strictly shared model.*the minimum param_budget here is 0\.50"):
        recursify(copy_of(model), num_loops=2, param_budget=0.3, calib=calib)
    assert not hasattr(model, "effml_recursive")


def test_explicit_svd_init_with_a_budget_still_allocates_by_activations():
    model = tiny_model("llama")
    calib = random_ids(model, 2, 16, seed=1)
    asvd = recursify(copy_of(model), num_loops=2, init="average", param_budget=0.7, calib=calib)
    svd = recursify(copy_of(model), num_loops=2, init="average", param_budget=0.7, calib=calib, lora_init="svd")
    assert svd.effml_report["recursify"]["lora_inits"].keys() == {"svd"}
    assert asvd.effml_report["recursify"]["lora_inits"].keys() == {"asvd"}
    assert svd.effml_report["recursify"]["allocation"]["ranks"] == asvd.effml_report["recursify"]["allocation"]["ranks"]


# --- defaults: asvd with calib, a warning without ----------------------------------------------
def test_default_init_is_asvd_with_calib_and_warns_without():
    model = tiny_model("llama")
    calib = random_ids(model, 2, 16, seed=1)
    with_calib = recursify(copy_of(model), num_loops=2, init="average", lora_rank=4, calib=calib)
    rep = with_calib.effml_report["recursify"]
    assert rep["config"]["lora_init"] == "asvd" and set(rep["lora_inits"]) == {"asvd"}
    with pytest.warns(UserWarning, match=r'calib=effml.calibration_data\(tok, "wikitext2", 16, 512\)'):
        plain = recursify(copy_of(model), num_loops=2, init="average", lora_rank=4)
    assert plain.effml_report["recursify"]["config"]["lora_init"] == "svd"
    explicit = recursify(copy_of(model), num_loops=2, init="average", lora_rank=4, lora_init="svd")
    ids = random_ids(model)
    with torch.no_grad():
        assert torch.equal(plain(ids).logits, explicit(ids).logits)
    with warnings.catch_warnings(record=True) as caught:  # explicit choices and rank 0 / full ranks: no warning
        warnings.simplefilter("always")
        recursify(copy_of(model), num_loops=2, lora_rank=4, lora_init="svd")
        recursify(copy_of(model), num_loops=2)
        recursify(copy_of(model), num_loops=2, lora_rank="full")
    assert not [w for w in caught if str(w.message) == NO_CALIB_WARNING]


def test_per_depth_rank_list():
    model = tiny_model("llama")
    rec = recursify(copy_of(model), num_loops=2, lora_rank=[2, {"q": 3}, 0, "full"], lora_init="svd")
    layers = rec.model.layers
    assert layers[0].self_attn.q_proj.ranks == {"q": 2} and layers[0].mlp.down_proj.ranks == {"down": 2}
    assert layers[1].self_attn.q_proj.ranks == {"q": 3} and not isinstance(layers[1].mlp.down_proj, DepthLoRALinear)
    assert not any(isinstance(m, DepthLoRALinear) for m in layers[2].modules())
    assert layers[3].mlp.down_proj.ranks == {"down": 64}
    with pytest.raises(ValueError, match="one entry per depth: the model has 4 layers, got 2"):
        recursify(copy_of(model), num_loops=2, lora_rank=[2, 2])
