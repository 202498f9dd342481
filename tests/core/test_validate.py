"""One check of token-id tensors, run by every entry point before any work; and the text rule
of effml.perplexity."""

import math

import pytest
import torch
import torch.nn.functional as F

import effml
from effml.core.calibrate import LayerwiseEngine
from effml.core.data import text_source_kind
from effml.core.validate import check_token_ids
from effml.recursive.uptrain import uptrain
from effml.testing import random_ids, tiny_model


def test_check_token_ids_cases():
    model = tiny_model("llama")  # vocabulary of 256
    ids = random_ids(model)
    assert check_token_ids(ids, model) is ids
    as_int32 = check_token_ids(ids.int(), model)
    assert as_int32.dtype == torch.long and torch.equal(as_int32, ids)
    with pytest.raises(ValueError, match=r"integer token ids \(a \[n, seq_len\] LongTensor\), got dtype torch.float32"):
        check_token_ids(ids.float(), model)
    with pytest.raises(ValueError, match="got dtype torch.bool"):
        check_token_ids(ids > 3, model)
    with pytest.raises(ValueError, match=r"got shape \(16,\) \(add a batch dimension"):
        check_token_ids(ids[0], model)
    with pytest.raises(ValueError, match=r"got list"):
        check_token_ids(ids.tolist(), model)
    bad = ids.clone()
    bad[1, 3] = 256
    with pytest.raises(ValueError, match=r"ids in \[\d+, 256\] but the model's vocabulary has 256 entries"):
        check_token_ids(bad, model)
    bad[1, 3] = -1
    with pytest.raises(ValueError, match=r"ids in \[-1, \d+\]"):
        check_token_ids(bad, 256, what="data")
    with pytest.raises(ValueError, match="at least 2 tokens"):
        check_token_ids(ids[:, :1], model, min_len=2)


def _no_work(monkeypatch):
    """Fail the test if calibration starts: the check must come first."""
    def refuse(*a, **k):
        raise AssertionError("calibration started before the input was checked")

    monkeypatch.setattr("effml.core.calibrate._Capture.start_batch", refuse)


@pytest.mark.parametrize("case", ["float", "too large", "negative", "1-D"])
def test_every_entry_point_refuses_bad_ids_before_working(case, monkeypatch):
    model = tiny_model("llama")
    ids = random_ids(model, 2, 8)
    bad = {"float": ids.float(), "too large": ids + 256, "negative": ids - 300, "1-D": ids[0]}[case]
    match = {"float": "dtype", "too large": "vocabulary", "negative": "vocabulary", "1-D": "shape"}[case]
    _no_work(monkeypatch)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calls = [
        lambda: effml.quantize(tiny_model("llama"), "gptq", w_bits=4, calib=bad),
        lambda: effml.quantize(tiny_model("llama"), "smoothquant", w_bits=8, a_bits=8, calib=bad),
        lambda: effml.prune(model, 0.5, method="wanda", calib=bad),
        lambda: effml.recursify(model, num_loops=2, lora_rank=4, lora_init="asvd", calib=bad),
        lambda: LayerwiseEngine(model, bad),
        lambda: uptrain(tiny_model("llama"), model, bad, steps=1),
    ]
    for call in calls:
        with pytest.raises(ValueError, match=match):
            call()
    after = model.state_dict()  # prune, recursify and the engine left the model as it was
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())


def test_int32_calibration_equals_long():
    model_a, model_b = tiny_model("llama"), tiny_model("llama")
    ids = random_ids(model_a, 2, 16)
    effml.prune(model_a, 0.5, method="wanda", allocation="uniform", calib=ids)
    effml.prune(model_b, 0.5, method="wanda", allocation="uniform", calib=ids.int())
    assert all(torch.equal(a, b) for a, b in zip(model_a.parameters(), model_b.parameters(), strict=True))


class CharTokenizer:
    """Bytes as token ids: an independent, transparent tokenizer for the text rule."""

    def __call__(self, text, return_tensors=None, add_special_tokens=True):
        ids = torch.tensor([list(text.encode())])

        class Out:
            input_ids = ids

        return Out()


def test_perplexity_of_a_literal_string_is_that_string():
    model = tiny_model("llama")
    text = "a short sentence, well under 256 characters"
    ids = torch.tensor(list(text.encode()))
    with torch.no_grad():
        logits = model(input_ids=ids[None, :16]).logits[0]
    plain = math.exp(F.cross_entropy(logits[:-1], ids[1:16]).item())
    got = effml.perplexity(model, CharTokenizer(), text=text, seq_len=16, max_windows=1, progress=False)
    assert got == pytest.approx(plain, rel=1e-6)
    with pytest.raises(ValueError, match="evaluated as literal text"):
        effml.perplexity(model, CharTokenizer(), text="wikitxt2", seq_len=64, progress=False)


def test_text_rule_file_then_name_then_literal(tmp_path, monkeypatch):
    f = tmp_path / "wikitext2"
    f.write_text("file text")
    assert text_source_kind("wikitext2") == "named"
    monkeypatch.chdir(tmp_path)
    assert text_source_kind("wikitext2") == "file"  # an existing file comes first
    assert text_source_kind(str(f)) == "file"
    assert text_source_kind("c4") == "named"
    assert text_source_kind("just some words") == "literal"
    assert text_source_kind("x" * 5000) == "literal"  # too long to be a path
    for missing in ("data/notes.txt", "no_such_file.raw", "./missing"):
        with pytest.raises(FileNotFoundError, match="no such text file"):
            text_source_kind(missing)
    model = tiny_model("llama")
    f.write_text("a" * 40)
    from_file = effml.perplexity(model, CharTokenizer(), text=str(f), seq_len=16, progress=False)
    assert from_file == effml.perplexity(model, CharTokenizer(), text="a" * 40, seq_len=16, progress=False)


def test_perplexity_checks_token_id_tensors():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="dtype"):
        effml.perplexity(model, text=torch.rand(64) * 100, seq_len=16)
    with pytest.raises(ValueError, match="vocabulary"):
        effml.perplexity(model, text=torch.arange(64) + 250, seq_len=16)
