"""SmolLM2-135M checks: ESD of all 210 linears, and the CLI prune -> save -> load round trip."""

import math
import time

import numpy as np
import pytest
import torch

import effml
from effml.cli import main as cli_main
from effml.prune import verify_sparsity
from effml.prune.esd import clear_cache

from .test_powerlaw import reference_fit

pytestmark = pytest.mark.real_model


def test_esd_of_smollm2(smollm2_pristine):
    model, _ = smollm2_pristine
    clear_cache()
    start = time.perf_counter()
    res = effml.esd(model, xmin="scan")
    first = time.perf_counter() - start
    assert len(res) == 210 and len(res.per_block()) == 30
    assert all(math.isfinite(r.alpha) and r.alpha > 1 for r in res)
    # independent route for two matrices: squared singular values + the reference loop
    for r in (res[0], res[-1]):
        w = model.get_submodule(r.name).weight.detach().double()
        lam = torch.linalg.svdvals(w).numpy() ** 2
        ref_alpha, _ = reference_fit(lam[lam > 1e-5])
        assert r.alpha == pytest.approx(ref_alpha, abs=1e-6)
    start = time.perf_counter()
    again = effml.esd(model, xmin="scan")
    assert time.perf_counter() - start < first  # served from the fingerprint cache
    np.testing.assert_array_equal(again.values(), res.values())


def test_cli_prune_save_load(tmp_path, capsys):
    out = tmp_path / "pruned"
    rc = cli_main(["prune", "--model", "smollm2-135m", "--method", "magnitude", "--allocation", "alpha",
                   "--sparsity", "0.5", "--epsilon", "0.2", "--no-eval", "--save", str(out)])
    assert rc == 0 and "achieved sparsity 0.5000" in capsys.readouterr().out
    model = effml.load(out)
    rep = model.effml_report["prune"]
    assert rep["config"]["allocation"] == "alpha" and len(rep["layers"]) == 210
    achieved = verify_sparsity(model)
    assert len(set(round(v, 3) for v in achieved.values())) > 1  # non-uniform allocation survived the reload
    assert cli_main(["prune", "--model", "smollm2-135m", "--sparsity", "1.2", "--no-eval"]) == 2
