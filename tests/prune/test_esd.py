import json

import numpy as np
import pytest
import torch

import effml
from effml.prune.esd import ESDResult, clear_cache, weights_fingerprint
from effml.prune.spectrum import gram_eigenvalues, many_eigenvalues
from effml.testing import tiny_model


@pytest.mark.parametrize("shape", [(40, 17), (17, 40), (33, 33)])
def test_gram_eigenvalues_are_squared_singular_values(shape):
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    expected = np.sort(torch.linalg.svdvals(w.double()).numpy() ** 2)
    np.testing.assert_allclose(gram_eigenvalues(w), expected, rtol=1e-10, atol=1e-12)
    ws = [w, w.T.contiguous() * 2]
    got = many_eigenvalues(ws, workers=2)
    np.testing.assert_allclose(got[1], 4 * expected, rtol=1e-10, atol=1e-12)


def test_esd_records_of_a_tiny_model(tmp_path):
    model = tiny_model("llama")
    res = effml.esd(model, xmin="scan")
    assert len(res) == 4 * 7
    assert [r.role for r in res[:7]] == ["q", "k", "v", "o", "gate", "up", "down"]
    r = res[5]  # block 0 up_proj: 96 x 64
    w = model.model.layers[0].mlp.up_proj.weight.detach().double()
    lam = np.sort(torch.linalg.svdvals(w).numpy() ** 2)
    assert r.shape == (96, 64) and r.n_evals == 64
    assert r.lambda_max == pytest.approx(lam[-1], rel=1e-10)
    assert r.stable_rank == pytest.approx(lam.sum() / lam[-1], rel=1e-10)
    assert r.alpha_hat == pytest.approx(r.alpha * np.log10(lam[-1]), rel=1e-12)
    p = lam / lam.sum()
    assert r.entropy == pytest.approx(-(p * np.log(p)).sum() / np.log(64), rel=1e-9)
    means = res.per_block()
    assert means[1] == pytest.approx(np.mean([x.alpha for x in res if x.block == 1]))
    rows = list(csv_rows(res.to_csv(tmp_path / "esd.csv")))
    assert len(rows) == 28 and float(rows[5]["alpha"]) == pytest.approx(r.alpha)
    data = json.loads(res.to_json(tmp_path / "esd.json").read_text())
    assert data["xmin"] == "scan" and len(data["records"]) == 28 and "eigenvalues" not in data["records"][0]


def csv_rows(path):
    import csv

    with open(path) as f:
        yield from csv.DictReader(f)


def test_fused_linears_give_one_record_per_role():
    res = effml.esd(tiny_model("phi3"))
    assert [r.role for r in res[:7]] == ["q", "k", "v", "o", "gate", "up", "down"]
    assert res[0].name.endswith("qkv_proj[q]") and res[1].shape == (32, 64)


def test_cache_is_keyed_by_weights_not_by_name():
    clear_cache()
    a, b = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    ra, rb = effml.esd(a), effml.esd(b)
    assert ra[0].alpha != rb[0].alpha  # same architecture and names, different weights
    before = weights_fingerprint([a.model.layers[0].self_attn.q_proj.weight])
    with torch.no_grad():
        a.model.layers[0].self_attn.q_proj.weight[3, 5] += 1e-3
    assert weights_fingerprint([a.model.layers[0].self_attn.q_proj.weight]) != before
    again = effml.esd(a)
    assert again[0].lambda_max != ra[0].lambda_max


def test_bad_arguments():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="xmin must be one of"):
        effml.esd(model, xmin="max")
    with pytest.raises(ValueError, match="metric must be one of"):
        effml.esd(model, metric="alpha_peak")
    assert isinstance(effml.esd(model, metric="stable_rank"), ESDResult)


def test_plot_esd(tmp_path):
    model = tiny_model("llama")
    res = effml.esd(model)
    out = effml.plot_esd(res, tmp_path / "esd.png", sparsity=[0.5, 0.6, 0.7, 0.8])
    assert out.stat().st_size > 10_000
    with pytest.raises(ValueError, match="unknown matrices"):
        effml.plot_esd(res, tmp_path / "x.png", matrices=["nope"])
