"""Every supported order of prune, quantize and recursify (pairs and triples), on a tiny model of
every registered family, each followed by effml.save + effml.load: the logits, the step history
and the measured sparsity / size must come back exactly. Orders effml refuses (quantize first,
recursify twice, ...) are covered by tests/compose/test_recipe.py."""

import pytest
import torch

import effml
from effml.core.report import _stored_weight, measure
from effml.core.surgery import iter_linears
from effml.testing import FAMILIES, random_ids, tiny_model

PRUNE = {"prune": {"sparsity": 0.5, "method": "wanda", "allocation": "uniform"}}
RTN = {"quantize": {"method": "rtn", "w_bits": 4}}
GPTQ = {"quantize": {"method": "gptq", "w_bits": 4}}
# stepwise init takes each shared block from one layer, so pruned zeros stay zeros; rank-4 LoRA per depth
RECURSIFY = {"recursify": {"num_loops": 2, "init": "stepwise", "lora_rank": 4}}

ORDERS = {
    "prune-rtn": [PRUNE, RTN],
    "prune-gptq": [PRUNE, GPTQ],
    "prune-recursify": [PRUNE, RECURSIFY],
    "recursify-prune": [RECURSIFY, PRUNE],
    "recursify-rtn": [RECURSIFY, RTN],
    "recursify-gptq": [RECURSIFY, GPTQ],
    "rtn-prune": [RTN, PRUNE],
    "gptq-prune": [GPTQ, PRUNE],
    "prune-recursify-gptq": [PRUNE, RECURSIFY, GPTQ],
    "recursify-prune-rtn": [RECURSIFY, PRUNE, RTN],
    "recursify-gptq-prune": [RECURSIFY, GPTQ, PRUNE],
}


def _weights(model) -> dict[str, torch.Tensor]:
    """Stored (dequantized) decoder-linear weights by module path."""
    return {ref.name: _stored_weight(ref.module)[0].clone() for ref in iter_linears(model)}


@pytest.mark.parametrize("order", list(ORDERS))
@pytest.mark.parametrize("family", FAMILIES)
def test_supported_order_runs_keeps_what_earlier_steps_did_and_round_trips(family, order, tmp_path):
    recipe = ORDERS[order]
    model = tiny_model(family)
    calib = random_ids(model, 2, 16)
    ids = random_ids(model, 2, 12, seed=1)
    measured = [measure(model)]  # before the first step, then after each
    for step in recipe:  # one step per call: the model's own history carries the order checks
        before = _weights(model)
        effml.compress(model, [step], calib)
        measured.append(measure(model))
        after = _weights(model)
        kind = next(iter(step))
        was, now = measured[-2], measured[-1]
        for name, w in before.items():
            if kind == "quantize":  # RTN / GPTQ keep every exact zero: pruned weights stay pruned
                assert (after[name][w == 0] == 0).all(), f"{name}: {step} brought pruned weights back"
            if kind == "prune":  # Wanda only zeroes: every other weight (float or on the grid) is kept
                assert ((after[name] == w) | (after[name] == 0)).all(), f"{name}: {step} changed kept weights"
        if kind == "prune":  # zeros are stored densely: same parameters and bytes
            assert now["sparsity"] == pytest.approx(0.5, abs=0.01)
            assert (now["parameters"], now["bytes"]) == (was["parameters"], was["bytes"])
        if kind == "quantize":  # same parameters (shared blocks stay shared), fewer bytes, zeros kept
            assert now["parameters"] == was["parameters"]
            assert 4.0 < now["linear_bits_per_weight"] < 5.0 and now["bytes"] < was["bytes"]
            assert now["sparsity"] >= was["sparsity"]
        if kind == "recursify":
            assert now["parameters"] < was["parameters"]

    steps = model.effml_report["steps"]
    assert [s["step"] for s in steps] == [next(iter(s)) for s in recipe]
    assert [s["method"] for s in steps] == [next(iter(s.values())).get("method", "recursify") for s in recipe]
    for entry, m in zip(steps, measured[1:]):
        assert {k: entry[k] for k in m} == m
    kinds = [s["step"] for s in steps]
    if "prune" in kinds and "recursify" not in kinds[kinds.index("prune"):]:
        effml.prune.verify_sparsity(model)  # the prune report survives later steps

    with torch.no_grad():
        want = model(ids).logits
    effml.save(model, tmp_path / "m")
    loaded = effml.load(tmp_path / "m")
    with torch.no_grad():
        got = loaded(ids).logits
    assert torch.equal(got, want)
    assert loaded.effml_report["steps"] == steps
    assert measure(loaded) == measure(model)
    if "prune" in kinds and "recursify" not in kinds[kinds.index("prune"):]:
        effml.prune.verify_sparsity(loaded)
