"""effml.load_model (and so every CLI --model) on folders written by effml.save, and on HF
folders that lack weights: the model as saved, or a clear refusal; never random weights."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from transformers import PreTrainedTokenizerFast

import effml
from effml.cli import main
from effml.quant.qlinear import QuantLinear
from effml.testing import random_ids, tiny_model

WORDS = "the a river city flows through capital of is and tower tall old new".split()


def tiny_tokenizer():
    """A word-level tokenizer whose ids fit the tiny models' 256-entry vocabulary."""
    vocab = {"[UNK]": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", bos_token="<s>", eos_token="</s>")


TEXT = " ".join(WORDS[i % len(WORDS)] for i in range(7 * 40))


@pytest.fixture(scope="module")
def quantized_dir(tmp_path_factory):
    model = tiny_model("llama")
    effml.quantize(model, "rtn", w_bits=4)
    path = tmp_path_factory.mktemp("q")
    effml.save(model, path, tokenizer=tiny_tokenizer())
    return model, path


def test_load_model_reads_an_effml_folder_as_saved(quantized_dir):
    model, path = quantized_dir
    loaded, tok = effml.load_model(str(path))
    assert isinstance(loaded.model.layers[0].mlp.down_proj, QuantLinear)
    ids = random_ids(model)
    assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    assert tok("the river").input_ids == tiny_tokenizer()("the river").input_ids
    with pytest.raises(ValueError, match="loads as saved"):
        effml.load_model(str(path), dtype=torch.bfloat16)


def test_cli_eval_on_an_effml_folder_is_the_saved_model(quantized_dir, capsys):
    model, path = quantized_dir
    out = path.parent / "row.json"
    args = ["eval", "--model", str(path), "--data", TEXT, "--seq-len", "16", "--max-windows", "2", "--json", str(out)]
    assert main(args) == 0
    row = json.loads(out.read_text())[0]
    ppl = effml.perplexity(model, tiny_tokenizer(), text=TEXT, seq_len=16, max_windows=2, progress=False)
    assert row["ppl(text)"] == round(ppl, 3)


def test_effml_folder_without_tokenizer_says_how_to_save_one(tmp_path, capsys):
    effml.save(tiny_model("llama"), tmp_path)
    with pytest.raises(FileNotFoundError, match=r"without a tokenizer: save it with effml.save\(model, dir, tokenizer\)"):
        effml.load_model(str(tmp_path))
    assert main(["eval", "--model", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "without a tokenizer" in err


def test_hf_folder_with_missing_weights_is_refused(tmp_path):
    model = tiny_model("llama")
    model.save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    loaded, _ = effml.load_model(str(tmp_path))  # complete: loads (attention kernel may differ: sdpa)
    ids = random_ids(model)
    torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    state = load_file(tmp_path / "model.safetensors")
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"lacks 1 weights.*model.layers.1.mlp.up_proj.weight.*random"):
        effml.load_model(str(tmp_path))


def test_damaged_effml_folder_via_cli_names_the_file(quantized_dir, tmp_path, capsys):
    import shutil

    _, path = quantized_dir
    copy = tmp_path / "copy"
    shutil.copytree(path, copy)
    data = bytearray((copy / "model.safetensors").read_bytes())
    data[-1] ^= 0x10
    (copy / "model.safetensors").write_bytes(bytes(data))
    assert main(["eval", "--model", str(copy)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(copy / "model.safetensors") in err and "sha256" in err
