"""effml's lm-eval tasks (``effml.core.harness``, the ``eval`` extra): the local WikiText-2 documents,
the harness's word perplexity against a plain-torch computation, the CLI, and bad input."""

from __future__ import annotations

import copy
import importlib.util
import json
import math
import re
import sys

import pytest
import torch
from lm_eval.tasks.wikitext import preprocess_wikitext as lm_eval_wikitext
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

import effml
from effml.cli import main
from effml.core.data import data_dirs
from effml.core.harness import TASKS_DIR, available_tasks, evaluate_tasks
from effml.testing import tiny_model

# WikiText-2 test split: 4358 lines; its published size (245,569 tokens) counts the words plus one
# end-of-line token per line
WT2_TEST_LINES, WT2_TEST_TOKENS, WT2_TEST_ARTICLES = 4358, 245_569, 62


def _task_module():
    spec = importlib.util.spec_from_file_location("effml_wikitext_local_under_test", TASKS_DIR / "wikitext_local.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


wl = _task_module()


@pytest.fixture(autouse=True)
def one_thread():
    """The tiny models gain nothing from threads, and a second OpenMP thread on a busy 2-core
    machine slows them 10-40x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def byte_tokenizer():
    """One token per UTF-8 byte (ids 0..255) plus <s>=256 and </s>=257: transparent and fits a tiny model."""
    # GPT-2's byte <-> printable-character table, which the ByteLevel pre-tokenizer uses
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    chars = {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(others)}
    vocab = {c: b for b, c in chars.items()}
    assert set(vocab) == set(pre_tokenizers.ByteLevel.alphabet())
    vocab.update({"<s>": 256, "</s>": 257})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


def tiny_byte_model():
    return tiny_model("llama", vocab_size=258, bos_token_id=256, eos_token_id=257, pad_token_id=257)


@torch.no_grad()
def plain_rolling_loglikelihood(model, ids: list[int], prefix: int, max_length: int) -> float:
    """Sum of log p(token | preceding tokens) over the document, every token scored once: targets go
    in chunks of ``max_length``, and each chunk's forward pass is the ``max_length`` tokens (the
    prefix token first) that precede its last target."""
    seq = torch.tensor([prefix] + ids)
    total, first = 0.0, 1
    while first < seq.numel():
        end = min(first + max_length, seq.numel())  # targets seq[first:end]
        start = max(0, end - 1 - max_length)
        logp = torch.log_softmax(model(input_ids=seq[None, start : end - 1]).logits[0].double(), -1)
        targets = seq[first:end]
        rows = torch.arange(first - 1, end - 1) - start
        total += logp[rows, targets].sum().item()
        first = end
    return total


def words(page: str) -> int:
    # lm-eval splits the page on whitespace runs; pages start with a space and end with a newline,
    # which add an empty piece at each end
    assert page[0].isspace() and page[-1].isspace()
    return len(page.split()) + 2


# --- the documents -------------------------------------------------------------------------------


def test_local_documents_are_the_hub_documents():
    pages = wl.wikitext2_pages("test")
    assert len(pages) == WT2_TEST_ARTICLES
    for page in pages:
        first, *rest = page.split("\n")
        assert wl.heading_level(first) == 1 and not any(wl.heading_level(line) == 1 for line in rest)
    # every word of the split, once
    assert sum(len(p.split()) for p in pages) == WT2_TEST_TOKENS - WT2_TEST_LINES
    # lm-eval's own detokenizer and counts give the same targets and counts as the mirrored ones
    for page in pages:
        doc = {"page": page}
        assert wl.wikitext_detokenizer(doc) == lm_eval_wikitext.wikitext_detokenizer(doc)
        assert wl.process_results(doc, [-1.5]) == lm_eval_wikitext.process_results(doc, [-1.5])


def test_blank_lines_are_rebuilt_as_in_the_original_file():
    """effml keeps the validation file intact (blank lines included): drop its blank lines, rebuild
    them, cut pages the hub's way: the same pages, all but one identical, and that one differs by
    one blank line."""
    path = next((d / "wikitext2/wiki.valid.tokens" for d in data_dirs() if (d / "wikitext2/wiki.valid.tokens").is_file()), None)
    assert path is not None, f"no wikitext2/wiki.valid.tokens under {data_dirs()}"
    lines = path.read_text(encoding="utf-8").replace("\r\n", "\n").split("\n")
    original = wl.split_pages(lines)
    rebuilt = wl.split_pages(wl.restore_blank_lines([line for line in lines if line.strip()]) + [""])
    assert len(original) == len(rebuilt) == 60
    differ = [i for i, (a, b) in enumerate(zip(original, rebuilt)) if a != b]
    assert len(differ) == 1
    a, b = original[differ[0]], rebuilt[differ[0]]
    assert len(b) == len(a) + 2 and re.split(r"\s+", a) == re.split(r"\s+", b)
    assert [len(re.split(r"\s+", p)) for p in original] == [len(re.split(r"\s+", p)) for p in rebuilt]


# --- the harness against plain torch -------------------------------------------------------------


def test_word_perplexity_equals_plain_torch():
    model, tok = tiny_byte_model(), byte_tokenizer()
    max_length, limit = 128, 2
    got = evaluate_tasks(model, tok, ["wikitext2_local"], limit=limit, max_length=max_length)["wikitext2_local"]
    assert got["docs"] == limit

    pages = wl.wikitext2_pages("test")[:limit]
    ll, n_words, n_bytes = 0.0, 0, 0
    for page in pages:
        text = lm_eval_wikitext.wikitext_detokenizer({"page": page})
        ids = list(text.encode("utf-8"))  # the byte tokenizer's ids are the bytes
        assert tok.encode(text, add_special_tokens=False) == ids
        assert len(ids) > 3 * max_length  # several rolling windows per document
        ll += plain_rolling_loglikelihood(model, ids, prefix=256, max_length=max_length)
        n_words += words(page)
        n_bytes += len(page.encode("utf-8"))
    assert math.log(got["word_perplexity"]) == pytest.approx(-ll / n_words, rel=1e-5)
    assert math.log(got["byte_perplexity"]) == pytest.approx(-ll / n_bytes, rel=1e-5)
    assert got["bits_per_byte"] == pytest.approx(-ll / n_bytes / math.log(2), rel=1e-5)

    # a window one token shorter scores the documents differently: the check can tell
    shorter = evaluate_tasks(model, tok, "wikitext2_local", limit=1, max_length=max_length - 1)["wikitext2_local"]
    ll1 = plain_rolling_loglikelihood(model, list(lm_eval_wikitext.wikitext_detokenizer({"page": pages[0]}).encode()),
                                      prefix=256, max_length=max_length - 1)
    assert math.log(shorter["word_perplexity"]) == pytest.approx(-ll1 / words(pages[0]), rel=1e-5)


def test_cli_eval_tasks(tmp_path, capsys):
    model, tok = tiny_byte_model(), byte_tokenizer()
    folder = tmp_path / "tiny"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    out = tmp_path / "res.json"
    assert main(["eval", "--model", str(folder), "--tasks", "wikitext2_local", "--limit", "1",
                 "--max-length", "96", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "word_perplexity" in printed and "wikitext2_local" in printed
    (row,) = json.loads(out.read_text())
    assert row["task"] == "wikitext2_local" and row["docs"] == 1
    ref = evaluate_tasks(model, tok, ["wikitext2_local"], limit=1, max_length=96)["wikitext2_local"]
    # the CLI's model runs SDPA attention, the in-memory one eager; the JSON holds 4 decimals
    assert row["word_perplexity"] == pytest.approx(ref["word_perplexity"], rel=1e-4)
    assert row["bits_per_byte"] == pytest.approx(ref["bits_per_byte"], abs=1e-4)


# --- bad input -----------------------------------------------------------------------------------


def test_unknown_task_is_refused_before_any_work():
    assert available_tasks() == ["wikitext2_local"]
    # model=None: nothing is touched before the names are checked
    with pytest.raises(ValueError, match=r"unknown task\(s\) \['wikitext'\].*wikitext2_local"):
        evaluate_tasks(None, None, ["wikitext2_local", "wikitext"])
    with pytest.raises(ValueError, match="no task given"):
        evaluate_tasks(None, None, [])
    with pytest.raises(ValueError, match="limit must be a positive"):
        evaluate_tasks(None, None, ["wikitext2_local"], limit=0)
    with pytest.raises(ValueError, match="max_length"):
        evaluate_tasks(None, None, ["wikitext2_local"], max_length=1)


def test_missing_lm_eval_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` raises ImportError
    with pytest.raises(ImportError, match=r"pip install 'effml\[eval\]'"):
        evaluate_tasks(None, None, ["wikitext2_local"])


def test_cli_refuses_bad_tasks_before_loading(capsys):
    # the model path does not exist: the task check comes first
    assert main(["eval", "--model", "/nonexistent/model", "--tasks", "hellaswag"]) == 2
    err = capsys.readouterr().err
    assert "unknown task(s) ['hellaswag']" in err and "wikitext2_local" in err
    assert main(["eval", "--model", "/nonexistent/model", "--limit", "2"]) == 2
    assert "--limit applies to --tasks only" in capsys.readouterr().err


# --- SmolLM2-135M --------------------------------------------------------------------------------


@pytest.mark.real_model
def test_smollm2_word_perplexity_ranks_like_effml_perplexity(smollm2_pristine):
    """FP SmolLM2 against 3-bit RTN: lm-eval's word perplexity and effml.perplexity agree on which is
    worse (first document, 1407 tokens, 512-token windows; two 512-token windows for effml)."""
    model, tok = smollm2_pristine
    w3 = effml.quantize(copy.deepcopy(model), method="rtn", w_bits=3)
    word = {name: evaluate_tasks(m, tok, ["wikitext2_local"], limit=1, max_length=512)["wikitext2_local"]["word_perplexity"]
            for name, m in (("fp", model), ("w3", w3))}
    ppl = {name: effml.perplexity(m, tok, "wikitext2", seq_len=512, max_windows=2, progress=False)
           for name, m in (("fp", model), ("w3", w3))}
    print(f"word perplexity {word}, effml perplexity {ppl}")
    assert 10 < word["fp"] < 200  # a 135M model on Wikipedia text: far from uniform, far from perfect
    assert word["w3"] > 2 * word["fp"] and ppl["w3"] > 2 * ppl["fp"]
