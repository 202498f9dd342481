"""`effml compress --model M --recipe FILE --out DIR`."""

import json

import pytest
import torch

from effml.cli import main


def test_bad_recipe_fails_before_the_model_is_loaded(tmp_path, capsys):
    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps([{"prune": {"sparsity": 0.5}}, {"quantize": {"method": "rtn", "w_bits": 9}}]))
    # the model path does not exist: reaching the load would fail differently
    assert main(["compress", "--model", str(tmp_path / "no-model"), "--recipe", str(recipe), "--out",
                 str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "recipe step 1 (quantize)" in err and "w_bits=9" in err
    recipe.write_text(json.dumps([{"quantize": {"method": "quarot"}}, {"prune": {"sparsity": 0.5}}]))
    assert main(["compress", "--model", str(tmp_path / "no-model"), "--recipe", str(recipe), "--out",
                 str(tmp_path / "out")]) == 2
    assert "put the prune step before the quantize step" in capsys.readouterr().err
    assert main(["compress", "--recipe", str(tmp_path / "none.yaml"), "--out", str(tmp_path / "out")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.real_model
def test_compress_command_calibrates_runs_saves_and_prints_the_history(tmp_path, smollm2_pristine, capsys):
    """On a tiny llama with SmolLM2's tokenizer: the saved model equals effml.compress run in
    process on the same calibration windows, and carries the history."""
    import effml
    from effml.testing import tiny_model

    _, tok = smollm2_pristine
    tiny = lambda: tiny_model("llama", vocab_size=len(tok), bos_token_id=tok.bos_token_id,  # noqa: E731
                              eos_token_id=tok.eos_token_id)
    folder, out = tmp_path / "tiny", tmp_path / "out"
    tiny().save_pretrained(folder)
    tok.save_pretrained(folder)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("- prune: {sparsity: 0.5, method: wanda, allocation: uniform}\n"
                      "- quantize: {method: gptq, w_bits: 4}\n")
    assert main(["compress", "--model", str(folder), "--recipe", str(recipe), "--out", str(out),
                 "--calib-samples", "2", "--calib-seq-len", "16", "--seq-len", "32", "--max-windows", "1"]) == 0
    printed = capsys.readouterr().out
    assert "prune" in printed and "gptq" in printed and "ppl(wikitext2)" in printed
    loaded = effml.load(out)

    model = tiny()
    calib = effml.calibration_data(tok, "wikitext2", n_samples=2, seq_len=16, seed=0, model=model)
    effml.compress(model, str(recipe), calib, device="cpu")  # what the command passes from --device
    strip = lambda steps: [{k: v for k, v in s.items() if k != "seconds"} for s in steps]  # noqa: E731
    assert strip(loaded.effml_report["steps"]) == strip(model.effml_report["steps"])
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
