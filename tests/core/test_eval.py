import math

import pytest
import torch
import torch.nn.functional as F

import effml
from effml.testing import FAMILIES, tiny_model


def _plain_perplexity(model, tokens, seq_len, max_windows=None):
    n = tokens.numel() // seq_len
    if max_windows:
        n = min(n, max_windows)
    total = 0.0
    for i in range(n):
        w = tokens[i * seq_len : (i + 1) * seq_len]
        with torch.no_grad():
            logits = model(input_ids=w[None]).logits[0]
        total += F.cross_entropy(logits[:-1], w[1:]).item()
    return math.exp(total / n)


@pytest.mark.parametrize("family", FAMILIES)
def test_perplexity_equals_plain_torch(family):
    model = tiny_model(family)
    tokens = torch.randint(3, 256, (16 * 5 + 7,), generator=torch.Generator().manual_seed(1))
    ref = _plain_perplexity(model, tokens, 16)
    assert effml.perplexity(model, text=tokens, seq_len=16, progress=False) == pytest.approx(ref, rel=1e-5)
    assert effml.perplexity(model, text=tokens, seq_len=16, batch_size=3, progress=False) == pytest.approx(ref, rel=1e-5)
    ref2 = _plain_perplexity(model, tokens, 16, max_windows=2)
    assert effml.perplexity(model, text=tokens, seq_len=16, max_windows=2, progress=False) == pytest.approx(ref2, rel=1e-5)


def test_seq_len_longer_than_text():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="longer than the evaluation text"):
        effml.perplexity(model, text=torch.arange(10), seq_len=16)


def test_fidelity():
    model, other = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    ids = torch.randint(3, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    same = effml.fidelity(model, model, ids)
    assert same["kl"] == pytest.approx(0.0, abs=1e-6) and same["top1_agreement"] == 1.0
    f = effml.fidelity(other, model, ids, batch_size=1)
    with torch.no_grad():
        lp = F.log_softmax(other(input_ids=ids).logits, -1)
        lq = F.log_softmax(model(input_ids=ids).logits, -1)
    kl = F.kl_div(lp, lq, log_target=True, reduction="sum").item() / ids.numel()
    agree = (lp.argmax(-1) == lq.argmax(-1)).float().mean().item()
    assert f["kl"] == pytest.approx(kl, rel=1e-4) and f["top1_agreement"] == pytest.approx(agree)


@pytest.mark.real_model
def test_perplexity_smollm2_text_matches_plain(smollm2_pristine):
    model, tok = smollm2_pristine
    text = "The tower is 324 metres tall, about the same height as an 81-storey building.\n" * 8
    tokens = tok(text, return_tensors="pt").input_ids[0]
    ref = _plain_perplexity(model, tokens, 64)
    assert effml.perplexity(model, tok, text=text, seq_len=64, progress=False) == pytest.approx(ref, rel=1e-5)
