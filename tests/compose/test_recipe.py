"""effml.compress: recipes from lists and files, validation of the whole recipe before any work,
and the step history on model.effml_report."""

import json
import warnings

import pytest
import torch
import torch.nn as nn

import effml
from effml.compose import RecipeError, validate_recipe
from effml.testing import random_ids, tiny_model

WANDA = {"prune": {"sparsity": 0.5, "method": "wanda", "allocation": "uniform"}}
MAGNITUDE = {"prune": {"sparsity": 0.5, "method": "magnitude", "allocation": "uniform"}}
RTN = {"quantize": {"method": "rtn", "w_bits": 4}}
GPTQ = {"quantize": {"method": "gptq", "w_bits": 4}}
RECURSIFY = {"recursify": {"num_loops": 2, "init": "stepwise", "lora_rank": 4}}
QUAROT = {"quantize": {"method": "quarot", "w_bits": 4}}


@pytest.fixture
def model():
    return tiny_model("llama")


@pytest.fixture
def calib(model):
    return random_ids(model, 2, 16)


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _refused(model, recipe, calib, *needles):
    """The recipe is refused with a message holding every needle, and the model is untouched
    (the valid steps before the bad one did not run)."""
    before = _state(model)
    with pytest.raises(RecipeError) as err:
        effml.compress(model, recipe, calib)
    for needle in needles:
        assert needle in str(err.value), f"{needle!r} not in {err.value}"
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert getattr(model, "effml_report", None) is None
    return str(err.value)


# --- the shape of a recipe -----------------------------------------------------------------------
@pytest.mark.parametrize("bad, needle", [
    ([], "non-empty list of steps"),
    ({"prune": {"sparsity": 0.5}}, "non-empty list of steps"),
    ([MAGNITUDE, {"distill": {}}], "recipe step 1: unknown step 'distill'"),
    ([MAGNITUDE, {"prune": {"sparsity": 0.6}, "quantize": {}}], "recipe step 1: each step is a mapping with one key"),
    ([MAGNITUDE, "quantize"], "recipe step 1: each step is a mapping with one key"),
    ([MAGNITUDE, {"quantize": [4]}], "recipe step 1 (quantize): options must be a mapping"),
    ([MAGNITUDE, {"quantize": {"method": "rtn", "calib": [1]}}], "pass calib= to effml.compress"),
])
def test_malformed_recipes_are_refused(model, calib, bad, needle):
    _refused(model, bad, calib, needle)


# --- options: each method's own config dataclass decides ------------------------------------------
@pytest.mark.parametrize("step, needles", [
    ({"prune": {"sparsity": 0.5, "sparsty": 0.6}}, ["recipe step 1 (prune)", "unknown option(s) ['sparsty']"]),
    ({"prune": {"method": "wanda"}}, ["recipe step 1 (prune)", "missing required option(s) ['sparsity']"]),
    ({"prune": {"sparsity": 1.5}}, ["recipe step 1 (prune)", "sparsity"]),
    ({"prune": {"sparsity": 0.5, "method": "random"}}, ["recipe step 1 (prune)", "method must be one of"]),
    ({"quantize": {"method": "awq"}}, ["recipe step 1 (quantize)", "unknown quantization method 'awq'"]),
    ({"quantize": {"method": "rtn", "w_bits": 9}}, ["recipe step 1 (quantize)", "w_bits=9"]),
    # alpha belongs to SmoothQuant's config, not GPTQ's
    ({"quantize": {"method": "gptq", "alpha": 0.5}}, ["recipe step 1 (quantize)", "unknown option(s) ['alpha']"]),
    ({"recursify": {"num_loops": 0}}, ["recipe step 1 (recursify)", "num_loops must be a positive int"]),
    ({"recursify": {"loops": 2}}, ["recipe step 1 (recursify)", "unknown option(s) ['loops']"]),
    ({"recursify": {"lora_init": "pca"}}, ["recipe step 1 (recursify)", "unknown lora_init 'pca'"]),
])
def test_bad_options_fail_before_the_first_step_runs(model, calib, step, needles):
    _refused(model, [WANDA, step], calib, *needles)


def test_options_the_model_does_not_allow(model, calib):
    # the tiny llama's linears take 64 (q/k/v/gate/up) and 96 (down) inputs
    _refused(model, [WANDA, {"quantize": {"method": "rtn", "group_size": 48}}], calib,
             "recipe step 1 (quantize rtn)", "group_size=48 does not divide the input dimension 64")
    _refused(model, [WANDA, {"prune": {"sparsity": None, "pattern": "2:3", "allocation": "uniform"}}], calib,
             "recipe step 1 (prune wanda)", "not divisible by 3")
    _refused(model, [WANDA, {"recursify": {"num_loops": 3}}], calib,
             "recipe step 1 (recursify)", "num_loops=3 does not divide the 4 layers")


def test_missing_calibration_names_every_step_that_needs_it(model):
    msg = _refused(model, [MAGNITUDE, RECURSIFY, GPTQ], None, "step 2 (quantize gptq)", "calibration data")
    assert "step 0" not in msg and "step 1" not in msg  # magnitude pruning and SVD-initialised LoRA are data-free
    _refused(model, [WANDA], None, "step 0 (prune wanda)", "calibration data")
    _refused(model, [{"recursify": {"lora_rank": 4, "lora_init": "asvd"}}], None, "step 0 (recursify)", "calibration")
    bad = torch.full((2, 16), model.config.vocab_size)
    _refused(model, [WANDA], bad, "vocabulary")


def test_data_free_recipe_runs_without_calibration(model):
    effml.compress(model, [MAGNITUDE, RTN])
    assert [s["step"] for s in model.effml_report["steps"]] == ["prune", "quantize"]


# --- orders --------------------------------------------------------------------------------------
@pytest.mark.parametrize("recipe, needles", [
    ([QUAROT, MAGNITUDE], ["step 1 (prune magnitude) cannot prune a model quantized by step 0 (quantize quarot)",
                           "put the prune step before the quantize step"]),
    ([RTN, GPTQ], ["step 0 (quantize rtn) already quantizes", "merge the options of step 1 (quantize gptq)"]),
    # not only neighbours: the prune in between does not make a second quantize acceptable
    ([RTN, MAGNITUDE, GPTQ], ["step 0 (quantize rtn) already quantizes", "step 2 (quantize gptq)"]),
    ([RECURSIFY, RECURSIFY], ["step 0 (recursify) already makes the model recursive", "recursify once"]),
    ([RTN, RECURSIFY], ["step 0 (quantize rtn)", "put the recursify step before the quantize step"]),
    ([RECURSIFY, {"quantize": {"method": "flatquant"}}],
     ["step 1 (quantize flatquant) cannot quantize a recursive model (made by step 0 (recursify))"]),
    ([RECURSIFY, MAGNITUDE, QUAROT], ["step 2 (quantize quarot) cannot quantize a recursive model"]),
    ([WANDA, {"prune": {"sparsity": 0.3, "method": "wanda", "allocation": "uniform"}}],
     ["step 1 (prune wanda) asks for sparsity 0.3, lower than the 0.5 that step 0 (prune wanda)"]),
])
def test_unsupported_orders_are_refused_with_the_step_and_the_fix(model, calib, recipe, needles):
    _refused(model, recipe, calib, "unsupported recipe", *needles)


def test_orders_with_a_cost_warn(model, calib):
    with pytest.warns(UserWarning, match="stores transformed .rotated. weights.*lose the sparsity"):
        validate_recipe([WANDA, QUAROT], model, calib)
    with pytest.warns(UserWarning, match="init='average'.*lose most of step 0 \\(prune wanda\\)'s sparsity"):
        validate_recipe([WANDA, {"recursify": {"init": "average"}}], model, calib)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the supported orders say nothing
        validate_recipe([WANDA, RECURSIFY, GPTQ], model, calib)
        validate_recipe([RECURSIFY, WANDA, RTN], model, calib)
        validate_recipe([RECURSIFY, GPTQ, WANDA], model, calib)  # pruning on the quantization grid


def test_the_models_own_history_counts(model, calib):
    effml.quantize(model, "rtn", 4)
    state = _state(model)
    for recipe, needle in ((GPTQ, "the model's earlier quantize (rtn) already quantizes"),
                           (RECURSIFY, "put the recursify step before the quantize step")):
        with pytest.raises(RecipeError, match=needle.replace("(", r"\(").replace(")", r"\)")):
            effml.compress(model, [recipe], calib)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    # a quantized model whose report was lost is still recognised by its modules
    del model.effml_report
    with pytest.raises(RecipeError, match="already quantizes"):
        effml.compress(model, [RTN])
    # ... and, its method unknown, not pruned on a grid effml cannot vouch for
    with pytest.raises(RecipeError, match="put the prune step before the quantize step"):
        effml.compress(model, [MAGNITUDE])

    rotated = tiny_model("llama")
    effml.quantize(rotated, "quarot", 4, w_mse=False)
    with pytest.raises(RecipeError, match=r"quantized by the model's earlier quantize \(quarot\)"):
        effml.compress(rotated, [MAGNITUDE])

    rec = tiny_model("llama")
    effml.recursify(rec, num_loops=2)
    with pytest.raises(RecipeError, match="the model's earlier recursify already makes the model recursive"):
        effml.compress(rec, [RECURSIFY])

    pruned = tiny_model("llama")
    effml.prune(pruned, 0.5, method="magnitude", allocation="uniform")
    with pytest.raises(RecipeError, match="lower than the 0.5 that the model's earlier prune"):
        effml.compress(pruned, [{"prune": {"sparsity": 0.3, "method": "magnitude", "allocation": "uniform"}}])
    # zeros made outside effml count too: measured, not read from a report
    del pruned.effml_report
    with pytest.raises(RecipeError, match=r"step 0 \(prune magnitude\).*already 0.5000 sparse"):
        effml.compress(pruned, [{"prune": {"sparsity": 0.3, "method": "magnitude", "allocation": "uniform"}}])


# --- recipe files and defaults ---------------------------------------------------------------------
def test_recipe_from_json_and_yaml_files_equals_the_list(tmp_path, calib):
    recipe = [WANDA, {"quantize": {"method": "rtn", "w_bits": 4, "group_size": 32}}]
    (tmp_path / "r.json").write_text(json.dumps(recipe))
    (tmp_path / "r.yaml").write_text(
        "- prune: {sparsity: 0.5, method: wanda, allocation: uniform}\n"
        "- quantize:\n    method: rtn\n    w_bits: 4\n    group_size: 32\n")
    outs = []
    for src in (recipe, tmp_path / "r.json", str(tmp_path / "r.yaml")):
        m = effml.compress(tiny_model("llama"), src, calib)
        outs.append((m.effml_report["steps"], m.state_dict()))
    for steps, state in outs[1:]:
        assert [(s["step"], s["method"], s["config"]) for s in steps] == [(s["step"], s["method"], s["config"])
                                                                          for s in outs[0][0]]
        assert all(torch.equal(v, outs[0][1][k]) for k, v in state.items())  # seeded: the same model


def test_bad_recipe_files(tmp_path, model):
    with pytest.raises(RecipeError, match="does not exist"):
        validate_recipe(tmp_path / "none.json")
    (tmp_path / "r.toml").write_text("x = 1")
    with pytest.raises(RecipeError, match="use a .json, .yaml or .yml file"):
        validate_recipe(tmp_path / "r.toml")
    (tmp_path / "r.json").write_text('[{"prune": {"sparsity": 0.5}')
    with pytest.raises(RecipeError, match="not valid JSON"):
        validate_recipe(tmp_path / "r.json")
    (tmp_path / "r.yaml").write_text("- prune: {sparsity: [0.5}\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        validate_recipe(tmp_path / "r.yaml")


def test_defaults_go_to_the_steps_that_accept_them(model, calib):
    steps = validate_recipe([WANDA, RECURSIFY, RTN], model, calib, defaults={"device": "cpu", "seed": 3})
    assert steps[0].options["device"] == "cpu" and "seed" not in steps[0].options  # prune has no seed
    assert steps[1].options["seed"] == 3 and "device" not in steps[1].options
    assert steps[2].options == {"method": "rtn", "w_bits": 4, "device": "cpu", "seed": 3}
    with pytest.raises(RecipeError, match=r"option\(s\) \['damping'\] apply to no step"):
        effml.compress(model, [RTN], calib, damping=0.1)


# --- the history ---------------------------------------------------------------------------------
def _decoder_weights(model):
    """Stored decoder-linear weights, computed here from the modules (independent of effml's
    report code): plain weights, or dequantized integer codes."""
    from effml.quant import QuantLinear

    out = []
    for m in model.model.layers.modules():
        if isinstance(m, QuantLinear):
            out.append(m.dequantized_weight())
        elif isinstance(m, nn.Linear):
            out.append(m.weight)
    return out


def test_history_records_every_step_and_survives_save_load(model, calib, tmp_path):
    effml.compress(model, [WANDA, RTN], calib)
    rep = model.effml_report
    steps = rep["steps"]
    assert [(s["step"], s["method"]) for s in steps] == [("prune", "wanda"), ("quantize", "rtn")]
    assert steps[0]["config"]["sparsity"] == 0.5 and steps[1]["config"]["w_bits"] == 4
    assert all(s["seconds"] >= 0 for s in steps)
    ws = _decoder_weights(model)
    zeros, n = sum(int((w == 0).sum()) for w in ws), sum(w.numel() for w in ws)
    assert steps[1]["sparsity"] == zeros / n
    assert steps[0]["sparsity"] == rep["prune"]["achieved_sparsity"]
    assert steps[1]["linear_bits_per_weight"] == rep["linear_bits_per_weight"]  # the quantize report's own count
    size = effml.model_size(model)
    assert (steps[1]["parameters"], steps[1]["bytes"]) == (size["parameters"], size["bytes"])
    assert steps[1]["bits_per_weight"] == round(size["bits_per_weight"], 3)
    assert steps[0]["bytes"] > steps[1]["bytes"] and steps[0]["parameters"] == steps[1]["parameters"]
    # older readers: the prune report and the quantize keys are where they always were
    assert rep["prune"]["config"]["method"] == "wanda" and rep["method"] == "rtn"

    effml.save(model, tmp_path / "m")
    loaded = effml.load(tmp_path / "m")
    assert loaded.effml_report["steps"] == steps
    assert loaded.effml_report["prune"]["layers"] == json.loads(json.dumps(rep["prune"]["layers"]))


def test_each_method_alone_records_the_same_history(calib):
    a, b = tiny_model("llama"), tiny_model("llama")
    effml.prune(a, 0.5, method="wanda", allocation="uniform", calib=calib)
    effml.quantize(a, "rtn", 4)
    effml.compress(b, [WANDA, RTN], calib)
    strip = lambda steps: [{k: v for k, v in s.items() if k != "seconds"} for s in steps]  # noqa: E731
    assert strip(a.effml_report["steps"]) == strip(b.effml_report["steps"])


def test_history_follows_a_quantize_step_finished_later(model, calib):
    """FlatQuant with quantize_weights=False leaves the weights float; finish_weights quantizes
    them afterwards, and the history must then show the finished model, not the float one."""
    from effml.quant import finish_weights

    effml.quantize(model, "flatquant", 4, calib=calib, epochs=0, quantize_weights=False)
    assert model.effml_report["steps"][-1]["linear_bits_per_weight"] > 16  # still float
    finish_weights(model, "rtn")
    last = model.effml_report["steps"][-1]
    assert len(model.effml_report["steps"]) == 1 and last["step"] == "quantize"
    assert last["linear_bits_per_weight"] == model.effml_report["linear_bits_per_weight"] < 5
    assert last["config"]["quantize_weights"] is True
