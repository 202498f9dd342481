import pytest
import torch

import effml
from effml.core import data as data_mod
from effml.core.data import DataUnavailableError, data_dirs, load_text, random_windows
from effml.testing import tiny_model


class CharTokenizer:
    """A stand-in tokenizer: one id per byte, enough for window logic."""

    def __call__(self, text, return_tensors="pt", add_special_tokens=True):
        class Out:
            pass

        out = Out()
        out.input_ids = torch.tensor([list(text.encode("utf-8"))], dtype=torch.long)
        return out


def test_windows_are_deterministic_by_seed_and_in_range():
    tokens = torch.arange(1000)
    a = random_windows(tokens, 5, 32, seed=0)
    assert a.shape == (5, 32)
    assert torch.equal(a, random_windows(tokens, 5, 32, seed=0))
    assert not torch.equal(a, random_windows(tokens, 5, 32, seed=1))
    assert torch.equal(a[:, 1:] - a[:, :-1], torch.ones(5, 31, dtype=torch.long))  # contiguous windows


def test_list_of_strings_and_local_file(tmp_path):
    tok = CharTokenizer()
    ids = effml.calibration_data(tok, ["hello world " * 20, "second document " * 20], n_samples=3, seq_len=16)
    assert ids.shape == (3, 16)
    f = tmp_path / "corpus.txt"
    f.write_bytes(b"line one\r\nline two\r\n" * 50)
    ids = effml.calibration_data(tok, str(f), n_samples=2, seq_len=20, seed=3)
    assert 13 not in ids  # CRLF normalised
    assert bytes(ids[0].tolist()).decode() in (b"line one\nline two\n" * 50).decode()


def test_seq_len_longer_than_text_is_a_clear_error():
    with pytest.raises(ValueError, match="longer than the text"):
        effml.calibration_data(CharTokenizer(), ["short"], n_samples=1, seq_len=64)


def test_unknown_source_error_lists_options():
    with pytest.raises(ValueError, match="wikitext2.*self"):
        effml.calibration_data(CharTokenizer(), "no_such_dataset_or_file", n_samples=1, seq_len=8)


def test_offline_without_local_copy_says_what_to_do(monkeypatch, tmp_path):
    monkeypatch.setattr(data_mod, "data_dirs", lambda: [tmp_path])
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    load_text.cache_clear()
    try:
        with pytest.raises(DataUnavailableError) as e:
            effml.calibration_data(CharTokenizer(), "wikitext2", n_samples=1, seq_len=8)
    finally:
        load_text.cache_clear()
    msg = str(e.value)
    assert "EFFML_DATA" in msg and "'self'" in msg and "list of strings" in msg


def test_local_wikitext_is_the_file_text_with_lf(tmp_path, monkeypatch):
    (tmp_path / "wikitext2").mkdir()
    (tmp_path / "wikitext2" / "wiki.test.raw").write_bytes(b" = Title = \r\n Body text .\r\n")
    monkeypatch.setenv("EFFML_DATA", str(tmp_path))
    load_text.cache_clear()
    try:
        text = load_text("wikitext2", "test")
    finally:
        load_text.cache_clear()
    assert text == " = Title = \n Body text .\n"
    assert data_dirs()[0] == tmp_path.resolve()


def test_hub_rows_give_the_same_text_as_the_local_file(monkeypatch, tmp_path):
    import sys
    import types

    rows = ["", " = Title = \n", "", " Body text .\n"]  # how the hub's wikitext rows look
    fake = types.ModuleType("datasets")
    fake.load_dataset = lambda *a, **k: {"text": rows}
    monkeypatch.setitem(sys.modules, "datasets", fake)
    monkeypatch.setattr(data_mod, "data_dirs", lambda: [tmp_path])
    load_text.cache_clear()
    try:
        assert load_text("wikitext2", "test") == " = Title = \n Body text .\n"
    finally:
        load_text.cache_clear()


def test_shared_wikitext_is_found():
    assert any((d / "wikitext2/wiki.test.raw").is_file() for d in data_dirs()), "put shared/ beside the checkout"
    text = load_text("wikitext2", "test")
    assert "\r" not in text and " = Robert Boulter = " in text
    assert "<unk>" in load_text("wikitext2", "calib")  # the tokenized validation split


def test_self_calibration_samples_from_the_model():
    model = tiny_model("llama")
    a = effml.calibration_data(None, "self", n_samples=3, seq_len=10, seed=0, model=model)
    b = effml.calibration_data(None, "self", n_samples=3, seq_len=10, seed=0, model=model)
    assert a.shape == (3, 10) and torch.equal(a, b)
    assert (a[:, 0] == model.config.bos_token_id).all()
    with pytest.raises(ValueError, match="model="):
        effml.calibration_data(None, "self", n_samples=1, seq_len=8)
