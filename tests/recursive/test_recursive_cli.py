"""`effml recursify` and `effml uptrain`, and the conversion on SmolLM2-135M itself."""

import json

import pytest
import torch

import effml
from effml.cli import main
from effml.recursive import recursify
from effml.testing import tiny_model


@pytest.fixture
def tiny_folder(tmp_path, smollm2_pristine):
    """A tiny llama with SmolLM2's tokenizer saved as an HF folder: the CLI loads it fast."""
    _, tok = smollm2_pristine
    model = tiny_model("llama", vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    folder = tmp_path / "tiny"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder, model, tok


@pytest.mark.real_model
def test_recursify_and_uptrain_cli(tmp_path, tiny_folder, capsys):
    folder, model, tok = tiny_folder
    rec_dir, up_dir = tmp_path / "rec", tmp_path / "up"
    assert main(["recursify", "--model", str(folder), "--num-loops", "2", "--init", "average", "--lora-rank", "8",
                 "--lora-init", "svd", "--out", str(rec_dir)]) == 0
    out = capsys.readouterr().out
    assert "non-embedding parameters" in out and "LoRA" in out
    loaded = effml.load(rec_dir)
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    ref = recursify(model, num_loops=2, init="average", lora_rank=8, lora_init="svd")
    with torch.no_grad():  # the CLI's model runs SDPA attention, the in-memory one eager: not bitwise
        assert torch.allclose(loaded(ids).logits, ref(ids).logits, atol=1e-5, rtol=1e-4)

    assert main(["uptrain", "--model", str(folder), "--student", str(rec_dir), "--out", str(up_dir), "--steps", "2",
                 "--batch-size", "1", "--train-seq-len", "32", "--n-samples", "4", "--lr", "1e-3",
                 "--checkpoint-dir", str(tmp_path / "ckpt")]) == 0
    assert "loss" in capsys.readouterr().out
    meta = json.loads((up_dir / "effml.json").read_text())
    assert meta["report"]["uptrain"]["config"]["steps"] == 2
    assert json.loads((tmp_path / "ckpt" / "state.json").read_text())["step"] == 2
    trained = effml.load(up_dir)
    with torch.no_grad():
        assert not torch.equal(trained(ids).logits, loaded(ids).logits)

    asvd_dir = tmp_path / "asvd"  # the default init is asvd, on --calib-data
    assert main(["recursify", "--model", str(folder), "--num-loops", "2", "--init", "average", "--lora-rank", "8",
                 "--n-samples", "2", "--calib-seq-len", "32", "--out", str(asvd_dir)]) == 0
    meta = json.loads((asvd_dir / "effml.json").read_text())
    assert meta["report"]["recursify"]["lora_inits"] == {"asvd": 7 * model.config.num_hidden_layers}

    budget_dir = tmp_path / "budget"
    assert main(["recursify", "--model", str(folder), "--num-loops", "2", "--init", "average", "--param-budget", "0.7",
                 "--n-samples", "2", "--calib-seq-len", "32", "--out", str(budget_dir)]) == 0
    assert "param_budget 0.7" in capsys.readouterr().out
    alloc = json.loads((budget_dir / "effml.json").read_text())["report"]["recursify"]["allocation"]
    assert alloc["params_used"] <= alloc["budget_params"]


@pytest.mark.real_model
def test_smollm2_conversion(smollm2):
    model, tok = smollm2
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        ref = model(ids).logits
    one = recursify(model, num_loops=1)
    with torch.no_grad():
        assert torch.equal(one(ids).logits, ref)


@pytest.mark.real_model
def test_smollm2_parameter_report(smollm2):
    model, _ = smollm2
    rec = recursify(model, num_loops=2, init="average", lora_rank=16, lora_targets=("k", "v"))
    rep = rec.effml_report["recursify"]
    assert rep["before"]["non_embedding"] == 106_203_456
    # 15 shared blocks, 30 depths of rank-16 LoRA on k and v (576 -> 192 in SmolLM2)
    assert rep["after"]["lora"] == 30 * 16 * (576 + 192) * 2
    assert rep["after"]["blocks"] == rep["before"]["blocks"] // 2
    assert rep["after"]["embeddings"] == rep["before"]["embeddings"] == 49152 * 576  # tied: counted once


def test_cli_bad_input_is_a_clear_error(tmp_path, capsys):
    # settings are checked before the model is loaded
    assert main(["recursify", "--model", "no-such-model", "--lora-rank", "-3", "--out", str(tmp_path)]) == 2
    assert "must be >= 0" in capsys.readouterr().err
    assert main(["recursify", "--model", "no-such-model", "--param-budget", "1.2", "--out", str(tmp_path)]) == 2
    assert "param_budget must be a fraction in (0, 1)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["recursify", "--strategy", "zigzag", "--out", str(tmp_path)])
    assert "invalid choice: 'zigzag'" in capsys.readouterr().err
