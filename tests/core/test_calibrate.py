import pytest
import torch

from effml.core.calibrate import LayerwiseEngine, logits_from_hidden, run_layerwise
from effml.testing import FAMILIES, random_ids, tiny_model


@pytest.mark.parametrize("family", FAMILIES)
def test_noop_callback_reproduces_logits(family):
    model = tiny_model(family)
    ids = random_ids(model, n=3, seq_len=24)  # longer than Gemma's sliding window of 8
    ref = model(input_ids=ids).logits
    visited = []
    out = run_layerwise(model, ids, lambda ctx: visited.append(ctx.index), batch_size=2)
    assert visited == list(range(model.config.num_hidden_layers))
    logits = logits_from_hidden(model, ids, torch.cat(out))
    assert (logits - ref).abs().max().item() < 1e-5
    # the model is left intact
    assert (model(input_ids=ids).logits - ref).abs().max().item() == 0


def _fp_hidden_states(model, ids):
    """Inputs of every decoder layer in the unmodified model, via forward pre-hooks."""
    seen = []
    hooks = [layer.register_forward_pre_hook(lambda m, a, k: seen.append(k.get("hidden_states", a[0] if a else None).clone()), with_kwargs=True)
             for layer in model.model.layers]
    with torch.no_grad():
        model(input_ids=ids)
    for h in hooks:
        h.remove()
    return seen


def _zero_down(ctx):
    ctx.block.mlp.down_proj.weight.data.mul_(0.5)


@pytest.mark.parametrize("mode", ["original", "compressed"])
def test_propagate_modes(mode):
    model = tiny_model("llama")
    ids = random_ids(model, n=2, seq_len=12)
    fp = _fp_hidden_states(model, ids)
    inputs_seen = []

    def cb(ctx):
        inputs_seen.append(torch.cat(ctx.inputs))
        if mode == "original":
            # targets are the unmodified block's outputs
            nxt = fp[ctx.index + 1] if ctx.index + 1 < len(fp) else None
            if nxt is not None:
                torch.testing.assert_close(torch.cat(ctx.fp_outputs), nxt, rtol=0, atol=1e-6)
        _zero_down(ctx)

    run_layerwise(model, ids, cb, propagate=mode)
    torch.testing.assert_close(inputs_seen[0], fp[0], rtol=0, atol=0)
    diff = (inputs_seen[2] - fp[2]).abs().max().item()
    if mode == "original":
        assert diff < 1e-6  # FP inputs throughout
    else:
        # compressed inputs: equal to the modified model's own hidden states
        assert diff > 1e-3
        torch.testing.assert_close(inputs_seen[2], _fp_hidden_states(model, ids)[2], rtol=0, atol=1e-6)


def test_hooks_observe_every_batch_and_nan_is_reported():
    model = tiny_model("mistral")
    ids = random_ids(model, n=4, seq_len=8)
    engine = LayerwiseEngine(model, ids, batch_size=3)
    rows = []

    def cb(ctx):
        mods = {"q": ctx.block.self_attn.q_proj}
        with ctx.hooks(mods, lambda n, m, x, y: rows.append(x.shape[0] * x.shape[1])):
            ctx.forward(keep=False)
        if ctx.index == 2:
            ctx.block.self_attn.o_proj.weight.data[0, 0] = float("nan")

    with pytest.raises(FloatingPointError, match=r"model\.layers\.2"):
        engine.run(cb, desc="test")
    assert rows[:2] == [3 * 8, 1 * 8]


def test_bad_engine_inputs():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="propagate"):
        run_layerwise(model, random_ids(model), lambda c: None, propagate="fp")
    with pytest.raises(ValueError, match=r"\[n_samples, seq_len\]"):
        run_layerwise(model, random_ids(model)[0], lambda c: None)


@pytest.mark.real_model
def test_noop_engine_on_smollm2(smollm2_pristine):
    model, tok = smollm2_pristine
    ids = tok(["The quick brown fox jumps over the lazy dog and keeps running."] * 2, return_tensors="pt").input_ids
    ref = model(input_ids=ids).logits
    out = run_layerwise(model, ids, lambda ctx: None)
    assert (logits_from_hidden(model, ids, torch.cat(out)) - ref).abs().max().item() < 1e-5
